"""One owner, always (DESIGN §3): two resumes of the same interrupted run started together,
on two connections to one SQLite file, 20 times. Exactly one takes the dead owner's lease and
executes the interrupted tool call; the other reports who owns the run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from alpaca_engine.engine import Engine, RunBusy
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.verification import verify_run
from tests.ownership_race import Effects, check, in_threads, interrupted_run, owners


@pytest.mark.parametrize("trial", range(20))
async def test_two_resumes_started_together_one_wins(tmp_path: Path, trial: int) -> None:
    url = f"sqlite:///{tmp_path}/race.db"
    store = SQLiteStore(url)
    await store.open()
    try:
        effects = Effects()
        run_id = await interrupted_run(store, effects)
        outcomes = await asyncio.to_thread(in_threads, lambda: SQLiteStore(url), run_id, effects)
        winner = check(outcomes, effects, run_id)
        final = await store.get_run(run_id)
        assert final.state == "succeeded" and final.output == "all done"
        assert final.crash_count == 1  # one crash recovered, by the winner's take-over
        takeovers = [r.data["reason"] for r in await store.list_audit(run_id)
                     if r.kind == "state.changed" and r.data["to"] == "running"]
        assert takeovers[-1] == f"claimed by {winner.owner}" and len(takeovers) == 2
        assert (await verify_run(store, final, None)).result.ok
    finally:
        await store.close()


async def test_a_live_owner_is_preempted_only_with_force(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path}/live.db")
    await store.open()
    try:
        effects = Effects(armed=False)
        wf = effects.workflow()
        live, other = owners()
        run = await Engine(store, lambda ref: wf).submit(wf, "agent", "go")
        claimed = await store.claim_run(run.id, live, 60, time.time())
        assert claimed is not None
        with pytest.raises(RunBusy, match=f"is owned by {live}"):
            await Engine(store, lambda ref: wf, owner=other).resume(run.id)
        assert (await store.get_run(run.id)).lease_owner == live
        done = await Engine(store, lambda ref: wf, owner=other).resume(run.id, force=True)
        assert done.state == "succeeded"
    finally:
        await store.close()

"""Two resumes of one interrupted run, started together (DESIGN §3, "one owner, always").

Shared by the SQLite (two threads, two store connections on one file) and PostgreSQL (two
stores on one schema) tests. The run's first execution dies in the middle of a tool call, its
owner a process of this host that no longer exists (provably dead), so either resume may take
the lease over; exactly one must, the other must report the run busy, and the interrupted call
must run once more, not twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from alpaca_engine.engine import Engine, RunBusy
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.base import Store
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool
from alpaca_engine.workflow import Workflow
from tests.helpers import workflow

HOLD_SECONDS = 0.3
"""How long the re-executed call takes: the loser's claim happens while the winner holds it."""


class Crash(asyncio.CancelledError):
    """Stands in for SIGKILL inside one process: nothing after it runs (a cancellation,
    because any other BaseException a tool raises is just a failed call, by design)."""


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@dataclass
class Effects:
    """The side effects of the tool, across every engine of a trial."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    armed: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def workflow(self) -> Workflow:
        @tool
        def side_effect(label: str, ctx: ToolContext) -> str:
            """Record an external side effect; the first 'second' dies mid-call."""
            with self.lock:
                self.calls.append((label, ctx.idempotency_key))
                crash = self.armed and label == "second"
                self.armed = self.armed and not crash
            if crash:
                raise Crash()
            if label == "second":
                time.sleep(HOLD_SECONDS)
            return f"did {label}"

        return workflow([{"tool": "side_effect", "args": {"label": "first"}},
                         {"tool": "side_effect", "args": {"label": "second"}}, "all done"],
                        [side_effect])


async def interrupted_run(store: Store, effects: Effects) -> str:
    """A run left ``running`` mid-tool under a dead owner of this host, lease still live."""
    wf = effects.workflow()
    owner = f"{socket.gethostname()}:{dead_pid()}:gone"
    eng = Engine(store, lambda ref: wf, owner=owner, lease_seconds=60)
    run = await eng.submit(wf, "agent", "go")
    with contextlib.suppress(Crash):
        await eng.execute(run.id)
    crashed = await store.get_run(run.id)
    assert crashed.state == RunState.RUNNING and crashed.lease_owner == owner
    return run.id


@dataclass
class Outcome:
    """What one resume ended with: the run record, or the busy message."""

    owner: str
    state: str | None = None
    busy: str | None = None


async def resume_as(store: Store, owner: str, run_id: str, effects: Effects,
                    start: Callable[[], Awaitable[None]]) -> Outcome:
    wf = effects.workflow()
    eng = Engine(store, lambda ref: wf, owner=owner, lease_seconds=60)
    await start()
    try:
        return Outcome(owner, state=str((await eng.resume(run_id)).state))
    except RunBusy as exc:
        return Outcome(owner, busy=str(exc))


def check(outcomes: list[Outcome], effects: Effects, run_id: str) -> Outcome:
    """Exactly one resume ran the run to the end; the other said who owns it. Returns the
    winner."""
    won = [o for o in outcomes if o.busy is None]
    lost = [o for o in outcomes if o.busy is not None]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert won[0].state == "succeeded", outcomes
    assert f"is owned by {won[0].owner}" in (lost[0].busy or ""), outcomes
    assert "\n" not in (lost[0].busy or "")
    # "second" ran when the first owner died and exactly once more, with the same key
    seconds = [key for label, key in effects.calls if label == "second"]
    assert seconds == [f"{run_id}:4", f"{run_id}:4"], effects.calls
    assert [label for label, _ in effects.calls].count("first") == 1
    return won[0]


def owners(n: int = 2) -> list[str]:
    """Owners alive in this process (a live owner is never judged dead)."""
    return [f"{socket.gethostname()}:{os.getpid()}:resume{i}" for i in range(n)]


def in_threads(make_store: Callable[[], Store], run_id: str, effects: Effects) -> list[Outcome]:
    """Two resumes, each on its own thread, event loop and store connection, released by one
    barrier so both read the dead lease before either claims it."""
    barrier = threading.Barrier(2)
    results: list[Outcome] = []

    async def one(owner: str) -> Outcome:
        store = make_store()
        await store.open()
        try:
            async def start() -> None:
                barrier.wait(timeout=30)
            return await resume_as(store, owner, run_id, effects, start)
        finally:
            await store.close()

    def thread(owner: str) -> None:
        results.append(asyncio.run(one(owner)))

    threads = [threading.Thread(target=thread, args=(o,)) for o in owners()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2, "a resume did not finish"
    return results

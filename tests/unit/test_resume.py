"""Resume from the journal: completed steps are replayed, the interrupted one re-executed
with the same idempotency key, and the model is sent the same conversation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from alpaca_engine.engine import Engine, RunBusy
from alpaca_engine.errors import LeaseLost
from alpaca_engine.journal import conversation_digest
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.records import StepRecord
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool
from tests.helpers import workflow


class Crash(asyncio.CancelledError):
    """Stands in for SIGKILL inside one process: nothing after it runs.

    A cancellation, because any other BaseException a tool raises is, by design, just a
    failed tool call (see test_poison_tools.py)."""


async def test_resume_after_crash_mid_tool(store):
    executed: list[tuple[str, str]] = []
    crash_once = {"armed": True}

    @tool
    def side_effect(label: str, ctx: ToolContext) -> str:
        executed.append((label, ctx.idempotency_key))
        if label == "second" and crash_once["armed"]:
            crash_once["armed"] = False
            raise Crash()
        return f"did {label}"

    script: list[Any] = [
        {"tool": "side_effect", "args": {"label": "first"}},
        {"tool": "side_effect", "args": {"label": "second"}},
        "all done",
    ]
    first_model = ScriptedModel(script)
    wf1 = workflow(first_model, [side_effect])
    eng1 = Engine(store, lambda ref: wf1, owner="host:1:a", lease_seconds=30)
    submitted = await eng1.submit(wf1, "agent", "go")
    with pytest.raises(Crash):
        await eng1.execute(submitted.id)

    crashed = await store.get_run(submitted.id)
    assert crashed.state == "running"
    steps = await store.list_steps(crashed.id)
    assert [(s.seq, s.status) for s in steps] == [
        (1, "completed"), (2, "completed"), (3, "completed"), (4, "started")]

    # A new process: a fresh model object, the same workflow definition.
    second_model = ScriptedModel(script)
    wf2 = workflow(second_model, [side_effect])
    eng2 = Engine(store, lambda ref: wf2, owner="host:2:b", lease_seconds=30)
    with pytest.raises(RunBusy):
        await eng2.resume(crashed.id)  # the lease is live and its owner unknown
    done = await eng2.resume(crashed.id, force=True)

    assert done.state == "succeeded" and done.output == "all done"
    # step 2 ("first") was not executed again; step 4 ("second") re-ran with the same key
    assert executed == [("first", f"{done.id}:2"), ("second", f"{done.id}:4"),
                        ("second", f"{done.id}:4")]
    # only one model call after the resume, and it saw exactly the pre-crash context + result
    assert len(second_model.calls) == 1
    assert len(first_model.calls) == 2
    resumed_conversation = second_model.calls[0]
    assert resumed_conversation[:4] == first_model.calls[1]
    assert [m.role for m in resumed_conversation[4:]] == ["assistant", "tool"]
    assert resumed_conversation[5].content == '"did second"'
    steps = await store.list_steps(done.id)
    assert steps[4].input["digest"] == conversation_digest(resumed_conversation)
    assert done.epoch == 2


async def test_stale_epoch_cannot_write(store):
    wf = workflow(["hi"], [])
    eng = Engine(store, lambda ref: wf, owner="host:1:a")
    run = await eng.submit(wf, "agent", "go")
    claimed = await store.claim_run(run.id, "host:1:a", 30, 100.0)
    assert claimed is not None
    stolen = await store.claim_run(run.id, "host:2:b", 30, 101.0, steal=True)
    assert stolen is not None and stolen.epoch == claimed.epoch + 1
    step = StepRecord(run_id=run.id, seq=1, kind="model", name="m")
    with pytest.raises(LeaseLost):
        await store.save_step(step, claimed.epoch)
    with pytest.raises(LeaseLost):
        await store.renew_lease(run.id, "host:1:a", claimed.epoch, 30, 102.0)
    await store.save_step(step, stolen.epoch)


async def test_resume_of_finished_run_is_a_no_op(store):
    wf = workflow(["hi"], [])
    eng = Engine(store, lambda ref: wf)
    run = await eng.run(wf, "agent", "go")
    again = await eng.resume(run.id)
    assert again.state == "succeeded" and again.updated_at == run.updated_at


async def test_resumed_step_is_recorded_as_resumed_not_reserved_again(store):
    @tool
    def once(ctx: ToolContext) -> str:
        if ctx.attempt == 1 and not getattr(once, "crashed", False):
            once.crashed = True  # type: ignore[attr-defined]
            raise Crash()
        return "ok"

    script: list[Any] = [{"tool": "once"}, "done"]
    wf = workflow(ScriptedModel(script), [once], budget={"max_tool_calls": 5})
    eng = Engine(store, lambda ref: wf, owner="host:1:a")
    run = await eng.submit(wf, "agent", "go")
    with pytest.raises(Crash):
        await eng.execute(run.id)
    done = await Engine(store, lambda ref: wf, owner="host:2:b").resume(run.id, force=True)
    assert done.state == "succeeded"
    kinds = [(a.kind, a.data.get("step")) for a in await store.list_audit(run.id)]
    assert kinds.count(("budget.reserved", 2)) == 1
    assert ("step.resumed", 2) in kinds
    assert (await store.get_ledger(run.id)).used["tool_calls"] == 1

"""The step gate: every refusal reaches the model as a structured result and is journaled."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from alpaca_engine.clock import FakeClock
from alpaca_engine.models.base import Message, ModelError, ToolSpec
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.breaker import BreakerPolicy
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.retry import RetryPolicy, TransientError
from tests.helpers import engine, workflow


@tool(capabilities=["math"])
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(capabilities=["net"])
async def fetch(url: str) -> str:
    """Pretend to fetch a URL."""
    return f"<html>{url}</html>"


def tool_results(model: ScriptedModel) -> list[Any]:
    """What the model was told after each tool call, from its last conversation."""
    last = model.calls[-1]
    return [json.loads(m.content or "null") for m in last if m.role == "tool"]


async def test_tool_calls_run_in_model_order_and_answer(store):
    order: list[str] = []

    @tool
    def record(label: str) -> str:
        order.append(label)
        return label.upper()

    model = ScriptedModel([
        {"calls": [{"tool": "record", "args": {"label": x}} for x in "cab"]},
        "done",
    ])
    run = await engine(store, workflow(model, [record])).run(
        workflow(model, [record]), "agent", "go")
    assert run.state == "succeeded" and run.output == "done"
    assert order == ["c", "a", "b"]
    assert tool_results(model) == ["C", "A", "B"]
    steps = await store.list_steps(run.id)
    assert [(s.seq, s.kind, s.name) for s in steps] == [
        (1, "model", "scripted"), (2, "tool", "record"), (3, "tool", "record"),
        (4, "tool", "record"), (5, "model", "scripted")]
    assert all(s.status == "completed" for s in steps)
    assert run.usage == {"steps": 5, "tool_calls": 3, "input_tokens": 20, "output_tokens": 10}


@pytest.mark.parametrize(("call", "code"), [
    ({"tool": "nope", "args": {}}, "unknown_tool"),
    ({"tool": "fetch", "args": {"url": "x"}}, "permission_denied"),
    ({"tool": "add", "args": '{"a": 1, "b": '}, "invalid_arguments"),
    ({"tool": "add", "args": {"a": "one", "b": 2}}, "invalid_arguments"),
    ({"tool": "add", "args": {"a": 1}}, "invalid_arguments"),
    ({"tool": "add", "args": {"a": 1, "b": 2, "c": 3}}, "invalid_arguments"),
    ({"tool": "add", "args": "[1, 2]"}, "invalid_arguments"),
])
async def test_refusals_reach_the_model_as_structured_errors(store, call, code):
    model = ScriptedModel([call, "recovered"])
    wf = workflow(model, [add, fetch], allow=["add"])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded"
    [result] = tool_results(model)
    assert result["error"]["code"] == code
    assert result["error"]["message"]
    step = (await store.list_steps(run.id))[1]
    assert step.status == "failed" and step.error and step.error["code"] == code
    kinds = [a.kind for a in await store.list_audit(run.id)]
    assert any(k.startswith("gate.") for k in kinds)


async def test_missing_capability_is_denied_and_tool_is_hidden(store):
    seen: list[list[str]] = []

    def decide(messages: list[Message], tools: list[ToolSpec]) -> Any:
        seen.append([t.name for t in tools])
        if len(seen) == 1:
            return {"tool": "fetch", "args": {"url": "http://x"}}
        return "ok"

    wf = workflow(FunctionModel(decide), [add, fetch], capabilities=frozenset({"math"}))
    run = await engine(store, wf).run(wf, "agent", "go")
    assert seen[0] == ["add"]  # the model only sees permitted tools
    step = (await store.list_steps(run.id))[1]
    assert step.error and step.error["code"] == "permission_denied"
    assert "net" in step.error["message"]


async def test_invalid_output_is_a_tool_failure(store):
    @tool
    def liar() -> int:
        return "not a number"  # type: ignore[return-value]

    model = ScriptedModel([{"tool": "liar"}, "ok"])
    wf = workflow(model, [liar])
    run = await engine(store, wf).run(wf, "agent", "go")
    [result] = tool_results(model)
    assert result["error"]["code"] == "invalid_output"
    assert run.state == "succeeded"


async def test_output_schema_violation_from_untyped_tool_is_invalid_output(store):
    from dataclasses import replace

    @tool
    def count() -> dict[str, int]:
        return {"n": 1}

    bad = replace(count, output_schema={"type": "object", "required": ["total"]})
    model = ScriptedModel([{"tool": "count"}, "ok"])
    wf = workflow(model, [bad])
    await engine(store, wf).run(wf, "agent", "go")
    [result] = tool_results(model)
    assert result["error"]["code"] == "invalid_output"
    assert "total" in result["error"]["message"]


async def test_oversized_arguments_are_refused(store):
    model = ScriptedModel([{"tool": "add", "args": {"a": 1, "b": 2, "pad": "x" * 300_000}}, "ok"])
    wf = workflow(model, [add])
    await engine(store, wf).run(wf, "agent", "go")
    assert tool_results(model)[0]["error"]["code"] == "payload_too_large"


async def test_transient_errors_are_retried_with_same_idempotency_key(store):
    keys: list[tuple[str, int]] = []

    @tool(retry=RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=0))
    def flaky(ctx: ToolContext) -> str:
        keys.append((ctx.idempotency_key, ctx.attempt))
        if ctx.attempt < 3:
            raise TransientError("upstream 503")
        return "ok"

    clock = FakeClock()
    model = ScriptedModel([{"tool": "flaky"}, "done"])
    wf = workflow(model, [flaky])
    run = await engine(store, wf, clock=clock).run(wf, "agent", "go")
    assert [k for k, _ in keys] == [f"{run.id}:2"] * 3
    assert [a for _, a in keys] == [1, 2, 3]
    assert clock.sleeps == [1.0, 2.0]
    step = (await store.list_steps(run.id))[1]
    assert step.status == "completed" and step.attempts == 3
    retries = [a for a in await store.list_audit(run.id) if a.kind == "tool.retry"]
    assert [r.data["attempt"] for r in retries] == [1, 2]


async def test_permanent_errors_are_not_retried(store):
    calls = 0

    @tool(retry=RetryPolicy(max_attempts=5, initial_delay=0))
    def broken() -> str:
        nonlocal calls
        calls += 1
        raise ValueError("bad input upstream")

    model = ScriptedModel([{"tool": "broken"}, "done"])
    wf = workflow(model, [broken])
    await engine(store, wf).run(wf, "agent", "go")
    assert calls == 1
    assert tool_results(model)[0]["error"] == {
        "code": "tool_error", "message": "ValueError: bad input upstream"}


async def test_tool_timeout(store):
    @tool(timeout=0.05)
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    model = ScriptedModel([{"tool": "slow"}, "done"])
    wf = workflow(model, [slow])
    await engine(store, wf).run(wf, "agent", "go")
    assert tool_results(model)[0]["error"]["code"] == "tool_timeout"


async def test_open_breaker_fails_fast_without_calling_the_tool(store):
    calls = 0

    @tool(breaker=BreakerPolicy(failure_threshold=2, failure_rate_threshold=None,
                                reset_timeout=60))
    def down() -> str:
        nonlocal calls
        calls += 1
        raise ConnectionError("refused")

    model = ScriptedModel([{"tool": "down"}, {"tool": "down"}, {"tool": "down"}, "gave up"])
    wf = workflow(model, [down])
    run = await engine(store, wf).run(wf, "agent", "go")
    codes = [r["error"]["code"] for r in tool_results(model)]
    assert codes == ["tool_error", "tool_error", "circuit_open"]
    assert calls == 2
    transitions = [a.data for a in await store.list_audit(run.id)
                   if a.kind == "breaker.transition"]
    assert transitions[0]["from"] == "closed" and transitions[0]["to"] == "open"


async def test_max_steps_ends_the_run_with_a_code(store):
    model = ScriptedModel([{"tool": "add", "args": {"a": 1, "b": 1}}] * 10)
    wf = workflow(model, [add], max_steps=3)
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "failed" and run.error_code == "max_steps_exceeded"


async def test_budget_exceeded_stops_the_run(store):
    model = ScriptedModel([{"tool": "add", "args": {"a": 1, "b": 1}}] * 10)
    wf = workflow(model, [add], budget={"max_tool_calls": 2})
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "failed" and run.error_code == "budget_exceeded"
    assert run.usage["tool_calls"] == 2


async def test_model_error_fails_the_run_with_a_recorded_state(store):
    def boom(messages: Any, tools: Any) -> Any:
        raise ModelError("provider said 400", status=400)

    wf = workflow(FunctionModel(boom), [add])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "failed" and run.error_code == "model_error"
    assert "400" in (run.error_message or "")
    [step] = await store.list_steps(run.id)
    assert step.status == "failed"


async def test_unexpected_exception_is_recorded_not_raised(store):
    def bug(messages: Any, tools: Any) -> Any:
        raise RuntimeError("bug in model glue")

    wf = workflow(FunctionModel(bug), [add])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "failed" and run.error_code == "internal_error"
    assert "bug in model glue" in (run.error_message or "")


async def test_unknown_agent_is_refused_before_storing(store):
    wf = workflow(["hi"], [add])
    with pytest.raises(KeyError):
        await engine(store, wf).submit(wf, "ghost", "hi")
    assert await store.list_runs() == []


async def test_cancel_requested_stops_a_running_run(store):
    eng = None

    @tool
    async def stop_me(ctx: ToolContext) -> str:
        await store.request_cancel(ctx.run_id)
        return "ok"

    wf = workflow([{"tool": "stop_me"}, {"tool": "stop_me"}, "never"], [stop_me])
    eng = engine(store, wf)
    run = await eng.run(wf, "agent", "go")
    assert run.state == "cancelled" and run.error_code == "cancelled"
    # The tool's outcome is journaled; the next model turn never starts (the check rides on
    # the commit that writes the outcome with that turn's start).
    steps = await store.list_steps(run.id)
    assert [(s.seq, s.kind, s.status) for s in steps] == [
        (1, "model", "completed"), (2, "tool", "completed")]
    ledger = await store.get_ledger(run.ledgers[0]) if run.ledgers else None
    assert ledger is None or ledger.used.get("steps") == 2


@pytest.mark.parametrize("max_steps", [1, 5], ids=["then-max-steps", "then-a-turn"])
async def test_a_cancel_during_the_last_tool_call_ends_the_run_cancelled(store, max_steps):
    """Whether a model turn would follow or the agent is out of steps, a cancel requested
    while a tool runs is what ends the run, and the tool's outcome is journaled."""

    @tool
    async def stop_me(ctx: ToolContext) -> str:
        await store.request_cancel(ctx.run_id)
        return "ok"

    wf = workflow([{"tool": "stop_me"}, "never"], [stop_me], max_steps=max_steps)
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "cancelled" and run.error_code == "cancelled"
    steps = await store.list_steps(run.id)
    assert [(s.seq, s.status) for s in steps] == [(1, "completed"), (2, "completed")]


async def test_deadline_times_out_the_run(store):
    clock = FakeClock()
    wf = workflow([{"tool": "add", "args": {"a": 1, "b": 2}}, "done"], [add],
                  budget={"deadline": clock.now() - 1})
    run = await engine(store, wf, clock=clock).run(wf, "agent", "go")
    assert run.state == "timed_out" and run.error_code == "deadline_exceeded"


async def test_tenant_policy_only_narrows(store):
    from alpaca_engine.engine import Engine
    from alpaca_engine.tools.governance import TenantPolicy

    seen: list[list[str]] = []

    def decide(messages: Any, tools: list[ToolSpec]) -> Any:
        seen.append([t.name for t in tools])
        if len(seen) == 1:
            return {"calls": [{"tool": "fetch", "args": {"url": "u"}},
                              {"tool": "add", "args": {"a": 1, "b": 2}}]}
        return "done"

    wf = workflow(FunctionModel(decide), [add, fetch])
    policy = TenantPolicy(deny_tools=("fet*",), capabilities=frozenset({"math", "extra"}))
    eng = Engine(store, lambda r: wf, tenant_policies={"acme": policy})
    run = await eng.run(wf, "agent", "go", tenant="acme")
    assert seen[0] == ["add"]
    steps = await store.list_steps(run.id)
    assert steps[1].error and steps[1].error["code"] == "permission_denied"
    assert "tenant policy" in steps[1].error["message"]
    assert steps[2].output == 3
    # another tenant is unaffected
    seen.clear()
    await eng.run(wf, "agent", "go", tenant="other")
    assert seen[0] == ["add", "fetch"]
    # a tenant's capability list never widens an agent's grant
    assert policy.narrow(frozenset({"math"})) == frozenset({"math"})

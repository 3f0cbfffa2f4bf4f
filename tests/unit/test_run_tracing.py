"""Spans of a real run tree: run → model/tool/delegation, the child run under its delegation."""

from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow
from tests.unit.test_tracing import spans  # noqa: F401  (the shared in-memory exporter)


@tool
def lookup(q: str) -> str:
    logging.getLogger("alpaca.tools").warning("looking up %s", q)
    return f"result for {q}"


@tool(approval="required")
def announce(text: str) -> str:
    """A gated side effect."""
    return f"announced {text}"


async def test_spans_nest_across_the_delegation(store, spans: InMemorySpanExporter) -> None:  # noqa: F811
    child = Agent(name="searcher", tools=["lookup"], model=ScriptedModel([
        {"tool": "lookup", "args": {"q": "alpacas"}}, "found"]))
    boss = Agent(name="boss", delegates_to=["searcher"], model=ScriptedModel([
        {"tool": "delegate_to_searcher", "args": {"task": "search"}}, "done"]))
    wf = Workflow(ref="t", agents={"boss": boss, "searcher": child},
                  tools=ToolRegistry([lookup]))
    run = await Engine(store, lambda r: wf).run(wf, "boss", "go")
    assert run.state == "succeeded"
    finished = spans.get_finished_spans()
    by_name: dict[str, list] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    boss_runs = [s for s in by_name["invoke_agent boss"]]
    searcher_spans = by_name["invoke_agent searcher"]
    delegation = next(s for s in searcher_spans if s.attributes.get("alpaca.delegation"))
    child_runs = [s for s in searcher_spans if not s.attributes.get("alpaca.delegation")]
    tool_span = by_name["execute_tool lookup"][0]
    chat = by_name["chat scripted"]
    trace_ids = {s.context.trace_id for s in finished}
    assert len(trace_ids) == 1  # one trace for the whole tree
    assert delegation.parent is not None
    assert delegation.parent.span_id in {s.context.span_id for s in boss_runs}
    # each execution of the child's run sits under the parent's delegation span
    assert child_runs and all(s.parent.span_id == delegation.context.span_id for s in child_runs)
    assert tool_span.parent.span_id in {s.context.span_id for s in child_runs}
    assert tool_span.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool_span.attributes["gen_ai.tool.name"] == "lookup"
    assert all(c.attributes["gen_ai.operation.name"] == "chat" for c in chat)
    assert {c.attributes["gen_ai.usage.input_tokens"] for c in chat} == {10}
    assert boss_runs[0].attributes["gen_ai.agent.name"] == "boss"


async def test_log_lines_carry_run_step_and_trace_ids(store, spans, capsys) -> None:  # noqa: F811
    from alpaca_engine.telemetry.logging import configure_logging

    handler = configure_logging(level="INFO", json=True)
    try:
        wf = Workflow(ref="t", agents={"a": Agent(name="a", tools=["lookup"], model=ScriptedModel(
            [{"tool": "lookup", "args": {"q": "x"}}, "ok"]))}, tools=ToolRegistry([lookup]))
        run = await Engine(store, lambda r: wf).run(wf, "a", "go")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()
             if line.startswith("{")]
    tool_line = next(line for line in lines if line["msg"] == "looking up x")
    assert tool_line["run_id"] == run.id and tool_line["step"] == 2
    assert tool_line["trace_id"] and len(tool_line["trace_id"]) == 32


async def test_a_pause_is_not_an_error_and_each_execution_has_its_own_run_span(
        store, spans: InMemorySpanExporter) -> None:  # noqa: F811
    wf = Workflow(ref="t", agents={"a": Agent(name="a", tools=["announce"], model=ScriptedModel(
        [{"tool": "announce", "args": {"text": "hi"}}, "done"]))}, tools=ToolRegistry([announce]))
    engine = Engine(store, lambda r: wf)
    run = await engine.run(wf, "a", "go")
    assert run.state == "waiting"
    [first] = [s for s in spans.get_finished_spans() if s.name == "invoke_agent a"]
    [gated] = [s for s in spans.get_finished_spans() if s.name == "execute_tool announce"]
    assert gated.status.status_code is StatusCode.OK and not gated.events
    reason = gated.attributes["alpaca.run.paused_reason"]
    assert "approval" in reason and "pending for announce" in reason
    assert first.status.status_code is StatusCode.OK
    assert first.attributes["alpaca.run.paused_reason"] == reason
    assert first.attributes["alpaca.run.state"] == "waiting"
    assert gated.parent.span_id == first.context.span_id
    assert first.start_time <= gated.start_time and gated.end_time <= first.end_time

    [approval] = await store.list_approvals(status="pending")
    await store.decide_approval(approval.id, approve=True, by="sue", comment=None, now=1.0)
    assert (await engine.run_tree(run.id)).state == "succeeded"
    executions = [s for s in spans.get_finished_spans() if s.name == "invoke_agent a"]
    assert len(executions) == 2
    second = executions[1]
    assert second.context.trace_id == first.context.trace_id
    assert second.attributes["alpaca.run.epoch"] > first.attributes["alpaca.run.epoch"]
    assert second.attributes["alpaca.run.state"] == "succeeded"
    assert "alpaca.run.paused_reason" not in second.attributes
    inside = [s for s in spans.get_finished_spans()
              if s.parent is not None and s.parent.span_id == second.context.span_id]
    assert {s.name for s in inside} == {"execute_tool announce", "chat scripted"}
    assert all(second.start_time <= s.start_time and s.end_time <= second.end_time
               for s in inside)

"""Approval gates: the run waits; exactly the approved arguments run; rejections and expiry."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from alpaca_engine.agents import Agent, ApprovalPolicy
from alpaca_engine.clock import FakeClock
from alpaca_engine.engine import Engine
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

SENT: list[tuple[str, str]] = []


@tool(capabilities=["notify"], approval="required")
def notify(text: str, ctx: ToolContext) -> str:
    """Send a message (gated)."""
    SENT.append((text, ctx.idempotency_key))
    return "sent"


@tool(capabilities=["money"], name="pay")
def _pay(amount: int) -> str:
    return f"paid {amount}"


pay = replace(_pay, cost=2.5)


def setup(script: list[Any], policy: ApprovalPolicy | None = None,
          tools: list[Any] | None = None) -> tuple[Workflow, ScriptedModel]:
    model = ScriptedModel(script)
    agent = Agent(name="agent", model=model, tools=["*"], approval=policy or ApprovalPolicy())
    return Workflow(ref="t", agents={"agent": agent},
                    tools=ToolRegistry(tools or [notify])), model


async def test_run_waits_then_executes_exactly_the_approved_arguments(store):
    SENT.clear()
    w, _model = setup([{"tool": "notify", "args": {"text": "hello all"}}, "notified"])
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "agent", "go")
    assert run.state == "waiting" and SENT == []
    [approval] = await store.list_approvals(status="pending")
    assert approval.action == "notify" and approval.arguments == {"text": "hello all"}
    assert approval.reason == "tool 'notify' requires approval"
    assert approval.requested_by == "agent:agent"
    # a supervisor edits nothing; the decision is recorded with who/when/comment
    await store.decide_approval(approval.id, approve=True, by="sue", comment="fine", now=1.0)
    done = await eng.run_tree(run.id)
    assert done.state == "succeeded" and done.output == "notified"
    assert [("hello all", f"{run.id}:2")] == SENT
    audit = await store.list_audit(run.id)
    decided = next(a for a in audit if a.kind == "approval.decided")
    assert decided.data["decision"] == "approved" and decided.actor == "user:sue"
    assert decided.data["comment"] == "fine"


async def test_rejection_reaches_the_model_as_the_tool_result(store):
    SENT.clear()
    w, model = setup([{"tool": "notify", "args": {"text": "x"}}, "ok, not sent"])
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "agent", "go")
    [approval] = await store.list_approvals()
    await store.decide_approval(approval.id, approve=False, by="sue", comment="too noisy",
                                now=1.0)
    done = await eng.run_tree(run.id)
    assert done.state == "succeeded" and SENT == []
    result = json.loads(model.calls[-1][-1].content or "")
    assert result["error"]["code"] == "approval_rejected"
    assert "sue" in result["error"]["message"] and "too noisy" in result["error"]["message"]


async def test_rejection_can_fail_the_run_by_policy(store):
    w, _ = setup([{"tool": "notify", "args": {"text": "x"}}, "never"],
                 ApprovalPolicy(on_reject="fail"))
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "agent", "go")
    [approval] = await store.list_approvals()
    await store.decide_approval(approval.id, approve=False, by="sue", comment=None, now=1.0)
    done = await eng.run_tree(run.id)
    assert done.state == "failed" and done.error_code == "approval_rejected"


async def test_expiry_denies_by_default(store):
    clock = FakeClock()
    w, _ = setup([{"tool": "notify", "args": {"text": "x"}}, "never"],
                 ApprovalPolicy(expires_after=60))
    eng = Engine(store, lambda r: w, clock=clock)
    run = await eng.run(w, "agent", "go")
    clock.advance(61)
    await eng.reap()
    done = await eng.run_tree(run.id)
    assert done.state == "failed" and done.error_code == "approval_expired"
    assert (await store.list_approvals())[0].status == "expired"


async def test_capability_and_cost_policies_gate_calls(store):
    w, _ = setup([{"tool": "pay", "args": {"amount": 3}}, "done"],
                 ApprovalPolicy(cost_above=1.0), tools=[pay])
    run = await Engine(store, lambda r: w).run(w, "agent", "go")
    [approval] = await store.list_approvals(run_id=run.id)
    assert "cost 2.5 above 1" in approval.reason
    w2, _ = setup([{"tool": "pay", "args": {"amount": 3}}, "done"],
                  ApprovalPolicy(capabilities=("money",)), tools=[pay])
    run2 = await Engine(store, lambda r: w2).run(w2, "agent", "go")
    [approval2] = await store.list_approvals(run_id=run2.id)
    assert "capability 'money'" in approval2.reason


async def test_delegation_to_a_named_agent_is_gated(store):
    child = Agent(name="notifier", model=ScriptedModel(["posted"]))
    boss = Agent(name="boss", model=ScriptedModel([
        {"tool": "delegate_to_notifier", "args": {"task": "post it"}}, "done"]),
        delegates_to=["notifier"], approval=ApprovalPolicy(delegations=("notifier",)))
    w = Workflow(ref="t", agents={"boss": boss, "notifier": child})
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "boss", "go")
    assert run.state == "waiting" and await store.list_runs(parent_id=run.id) == []
    [approval] = await store.list_approvals()
    assert approval.kind == "delegation" and approval.action == "notifier"
    await store.decide_approval(approval.id, approve=True, by="sue", comment=None, now=1.0)
    done = await eng.run_tree(run.id)
    assert done.state == "succeeded"
    [c] = await store.list_runs(parent_id=run.id)
    assert c.output == "posted"

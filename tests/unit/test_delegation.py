"""Delegation trees that cannot run away: depth, cycles, attenuation, shared budgets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from alpaca_engine.agents import Agent, ApprovalPolicy
from alpaca_engine.budget import BudgetExceeded
from alpaca_engine.engine import Engine
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.records import LedgerRecord, RunRecord, StepRecord
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.governance import TenantPolicy, check_tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow


@tool(capabilities=["net"])
def fetch(url: str) -> str:
    """Fetch a page."""
    return f"page {url}"


@tool(capabilities=["math"])
def add(a: int, b: int) -> int:
    return a + b


def delegate(target: str, task: str = "do it") -> dict[str, Any]:
    return {"tool": f"delegate_to_{target}", "args": {"task": task}}


def wf(agents: list[Agent], *, max_depth: int = 3, budget: dict[str, Any] | None = None,
       tools: list[Any] | None = None) -> Workflow:
    return Workflow(ref="test", agents={a.name: a for a in agents},
                    tools=ToolRegistry(tools if tools is not None else [fetch, add]),
                    max_depth=max_depth, budget=budget or {})


def results(model: ScriptedModel) -> list[Any]:
    return [json.loads(m.content or "null") for m in model.calls[-1] if m.role == "tool"]


async def test_orchestrator_delegates_and_gets_the_childs_answer(store):
    boss_model = ScriptedModel([delegate("searcher", "find alpacas"), "summary done"])
    searcher = Agent(name="searcher", model=ScriptedModel([
        {"tool": "fetch", "args": {"url": "u"}}, "alpacas found"]), tools=["fetch"])
    boss = Agent(name="boss", model=boss_model, delegates_to=["searcher"])
    w = wf([boss, searcher])
    run = await Engine(store, lambda r: w).run(w, "boss", "go")
    assert run.state == "succeeded" and run.output == "summary done"
    [child] = await store.list_runs(parent_id=run.id)
    assert child.state == "succeeded" and child.depth == 1
    assert child.ancestry == ["boss", "searcher"] and child.root_id == run.id
    assert results(boss_model) == [{"agent": "searcher", "run_id": child.id,
                                    "output": "alpacas found"}]
    # the child's steps are journaled under the child; the parent has a delegation step
    assert [s.kind for s in await store.list_steps(child.id)] == ["model", "tool", "model"]
    parent_steps = await store.list_steps(run.id)
    assert parent_steps[1].kind == "delegation" and parent_steps[1].status == "completed"
    # the tree shares one ledger: the root's
    ledger = await store.get_ledger(run.id)
    assert ledger.used["steps"] == 6 and ledger.used["tool_calls"] == 1


async def test_model_sees_only_allowed_delegations(store):
    seen: list[str] = []

    class Spy(ScriptedModel):
        async def complete(self, messages, tools):  # type: ignore[no-untyped-def]
            seen.extend(t.name for t in tools)
            return await super().complete(messages, tools)

    boss = Agent(name="boss", model=Spy([delegate("hacker"), "ok"]), delegates_to=["helper"])
    helper = Agent(name="helper", model=ScriptedModel(["hi"]))
    hacker = Agent(name="hacker", model=ScriptedModel(["pwned"]))
    w = wf([boss, helper, hacker])
    run = await Engine(store, lambda r: w).run(w, "boss", "go")
    assert "delegate_to_helper" in seen and "delegate_to_hacker" not in seen
    step = (await store.list_steps(run.id))[1]
    assert step.error and step.error["code"] == "permission_denied"
    assert await store.list_runs(parent_id=run.id) == []


async def test_cycles_are_refused(store):
    # A -> B -> A
    a = Agent(name="a", model=ScriptedModel([delegate("b"), "a done"]), delegates_to=["b"])
    b_model = ScriptedModel([delegate("a"), "b done"])
    b = Agent(name="b", model=b_model, delegates_to=["a"])
    w = wf([a, b])
    run = await Engine(store, lambda r: w).run(w, "a", "go")
    assert run.state == "succeeded"
    [child] = await store.list_runs(parent_id=run.id)
    refused = (await store.list_steps(child.id))[1]
    assert refused.error and refused.error["code"] == "cycle_detected"
    assert "a -> b -> a" in refused.error["message"]
    # A -> A
    self_model = ScriptedModel([delegate("me"), "ok"])
    me = Agent(name="me", model=self_model, delegates_to=["me"])
    w2 = wf([me])
    run2 = await Engine(store, lambda r: w2).run(w2, "me", "go")
    assert results(self_model)[0]["error"]["code"] == "cycle_detected"
    assert run2.state == "succeeded"


async def test_depth_limit(store):
    chain = [Agent(name=f"a{i}", model=ScriptedModel([delegate(f"a{i + 1}"), f"a{i} ok"]),
                   delegates_to=[f"a{i + 1}"]) for i in range(4)]
    chain.append(Agent(name="a4", model=ScriptedModel(["leaf"])))
    w = wf(chain, max_depth=2)
    run = await Engine(store, lambda r: w).run(w, "a0", "go")
    tree = await store.list_runs(root_id=run.id)
    assert max(r.depth for r in tree) == 2
    deepest = next(r for r in tree if r.depth == 2)
    step = (await store.list_steps(deepest.id))[1]
    assert step.error and step.error["code"] == "depth_exceeded"


async def test_capabilities_are_attenuated(store):
    child_model = ScriptedModel([{"tool": "fetch", "args": {"url": "x"}}, "no net"])
    parent = Agent(name="parent", model=ScriptedModel([delegate("child"), "done"]),
                   capabilities=frozenset({"math"}), delegates_to=["child"])
    child = Agent(name="child", model=child_model, tools=["*"],
                  capabilities=frozenset({"math", "net"}))
    w = wf([parent, child])
    run = await Engine(store, lambda r: w).run(w, "parent", "go")
    [c] = await store.list_runs(parent_id=run.id)
    assert c.capabilities == ["math"]
    error = results(child_model)[0]["error"]
    assert error["code"] == "permission_denied"
    assert error["message"] == (
        "tool 'fetch' needs capabilities not granted: net (the agent declares net, but its"
        " parent run does not hold it, and a delegated run keeps only what its parent has)")


def test_a_denial_names_who_narrowed_the_capabilities() -> None:
    # The agent never declared it: the plain reason. The tenant took it: the tenant is named.
    assert check_tool(fetch, ["*"], frozenset({"math"}), declared=frozenset({"math"})).rule \
        == "tool 'fetch' needs capabilities not granted: net"
    tenant = TenantPolicy(capabilities=frozenset({"math"}))
    assert check_tool(fetch, ["*"], frozenset({"net"}), tenant, declared=None).rule == (
        "tool 'fetch' needs capabilities not granted: net"
        " (the tenant policy does not allow net)")


async def test_budget_exceeded_stops_the_whole_tree(store):
    worker = Agent(name="worker", tools=["add"], model=ScriptedModel(
        [{"tool": "add", "args": {"a": 1, "b": 1}}] * 10))
    boss = Agent(name="boss", model=ScriptedModel([delegate("worker"), "never"]),
                 delegates_to=["worker"])
    w = wf([boss, worker], budget={"max_tool_calls": 3})
    run = await Engine(store, lambda r: w).run(w, "boss", "go")
    [child] = await store.list_runs(parent_id=run.id)
    assert child.state == "failed" and child.error_code == "budget_exceeded"
    assert run.state == "failed" and run.error_code == "budget_exceeded"
    ledger = await store.get_ledger(run.id)
    assert ledger.used["tool_calls"] == 3 and ledger.exhausted


async def test_child_sub_limit_never_exceeds_what_remains(store):
    worker = Agent(name="worker", tools=["add"], budget={"max_tool_calls": 50},
                   model=ScriptedModel([{"tool": "add", "args": {"a": 1, "b": 1}}] * 10))
    boss = Agent(name="boss", model=ScriptedModel([delegate("worker"), "after"]),
                 delegates_to=["worker"])
    w = wf([boss, worker], budget={"max_tool_calls": 4})
    run = await Engine(store, lambda r: w).run(w, "boss", "go")
    [child] = await store.list_runs(parent_id=run.id)
    sub = await store.get_ledger(child.id)
    assert sub.limits["tool_calls"] == 4  # asked 50, only 4 remained
    assert child.error_code == "budget_exceeded" and child.ledgers == [run.id, child.id]


async def test_concurrent_reservations_never_overspend(store):
    """Many children of one tree reserving at once on the shared root ledger."""
    await store.create_run(RunRecord(id="root", agent="a", workflow="w", input="x",
                                     root_id="root", ledgers=["root"]),
                           ledger=LedgerRecord(id="root", limits={"tool_calls": 25}))
    children = []
    for i in range(20):
        cid = f"root.{i}"
        await store.create_run(RunRecord(id=cid, agent="b", workflow="w", input="x",
                                         root_id="root", parent_id="root", depth=1,
                                         ledgers=["root"]))
        children.append(await store.claim_run(cid, f"w{i}", 30, 1.0))

    async def spend(child: RunRecord) -> int:
        ok = 0
        for seq in range(1, 6):
            try:
                await store.save_step(StepRecord(run_id=child.id, seq=seq, kind="tool",
                                                 name="t"), child.epoch,
                                      reserve={"tool_calls": 1})
                ok += 1
            except BudgetExceeded:
                pass
            await asyncio.sleep(0)
        return ok

    granted = await asyncio.gather(*(spend(c) for c in children))
    assert sum(granted) == 25
    assert (await store.get_ledger("root")).used == {"tool_calls": 25}


async def test_cancel_cancels_the_subtree(store):
    gate = Agent(name="child", tools=["fetch"], model=ScriptedModel(
        [{"tool": "fetch", "args": {"url": "u"}}, "x"]),
        approval=ApprovalPolicy(tools=("fetch",)))
    boss = Agent(name="boss", model=ScriptedModel([delegate("child"), "x"]),
                 delegates_to=["child"])
    w = wf([boss, gate])
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "boss", "go")
    [child] = await store.list_runs(parent_id=run.id)
    assert run.state == "waiting" and child.state == "waiting"
    cancelled = await eng.cancel(run.id)
    assert [r.id for r in cancelled] == [child.id, run.id]
    assert all(r.state == "cancelled" for r in cancelled)


async def test_each_delegation_is_audited_allowed_once(store):
    # The parent pauses twice on the same step (approval of the delegation, then the running
    # child) and resumes each time; the record still says "allowed" once per delegation.
    boss = Agent(name="boss", model=ScriptedModel([delegate("a"), delegate("b"), "done"]),
                 delegates_to=["a", "b"], approval=ApprovalPolicy(delegations=("b",)))
    a = Agent(name="a", model=ScriptedModel(["a done"]))
    b = Agent(name="b", model=ScriptedModel(["b done"]))
    w = wf([boss, a, b])
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "boss", "go")
    assert run.state == "waiting"
    [pending] = await store.list_approvals(run_id=run.id)
    await store.decide_approval(pending.id, approve=True, by="sue", comment=None, now=0.0)
    run = await eng.run_tree(run.id)
    assert run.state == "succeeded"
    allowed = [r.data["target"] for r in await store.list_audit(run.id)
               if r.kind == "delegation.allowed"]
    assert allowed == ["a", "b"]


async def test_a_tree_of_one_is_not_read_again_after_its_end_but_a_delegating_one_is(store):
    calls: list[str] = []
    for name in ("list_runs", "get_run", "transition"):
        real = getattr(store, name)

        async def spy(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls.append(_name)
            return await _real(*args, **kw)

        setattr(store, name, spy)
    solo = Agent(name="solo", model=ScriptedModel(["hi"]))
    boss = Agent(name="boss", model=ScriptedModel([delegate("solo"), "done"]),
                 delegates_to=["solo"])
    w = wf([boss, solo])
    eng = Engine(store, lambda r: w)
    run = await eng.run(w, "solo", "go")
    # just created, the tree is that run: not listed; it never delegated: its end, as
    # written, is the tree's answer
    assert calls == ["transition"]
    assert run.state == "succeeded" and run == await store.get_run(run.id)
    calls.clear()
    run = await eng.run(w, "boss", "go")
    # a root that delegated may have runs left in its tree: listed again, read again
    assert calls[-3:] == ["transition", "list_runs", "get_run"]
    assert run.state == "succeeded" and run.output == "done"
    assert run == await store.get_run(run.id)

"""Threads through the Python API (DESIGN §10): history rebuilt from the journal, the history
policy and its audit, one turn at a time, thread budgets, forks and deletion."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from alpaca_engine import Engine
from alpaca_engine.agents import Agent, HistoryPolicy
from alpaca_engine.errors import NotFound, TurnInProgress
from alpaca_engine.forks import ForkPastEnd
from alpaca_engine.journal import conversation_digest
from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.store.base import Store
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.verification import verify_run
from alpaca_engine.workflow import Workflow
from tests.unit.test_resume import Crash

CALLS: list[list[Message]] = []
EFFECTS: list[str] = []


@tool
def remember(fact: str) -> str:
    """Note a fact."""
    EFFECTS.append(fact)
    return f"noted {fact}"


def answer(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """Notes each user message with a tool, then answers with every fact noted so far in the
    conversation (so an answer shows exactly which earlier turns the model was sent)."""
    CALLS.append(list(messages))
    last = messages[-1]
    if last.role == "user":
        if last.content == "fail":
            raise RuntimeError("the model broke")
        return {"tool": "remember", "args": {"fact": last.content}}
    facts = [m.content for m in messages if m.role == "tool"]
    return "I know: " + "; ".join(str(f) for f in facts)


def make_workflow(history: HistoryPolicy | None = None, budget: dict[str, Any] | None = None,
                  ) -> Workflow:
    agent = Agent(name="memo", model=FunctionModel(answer), instructions="Remember things.",
                  tools=["remember"], history=history or HistoryPolicy())
    return Workflow(ref="memo", agents={"memo": agent}, tools=ToolRegistry([remember]),
                    budget=budget or {})


@pytest.fixture(autouse=True)
def _clear() -> None:
    CALLS.clear()
    EFFECTS.clear()


def engine_for(store: Store, wf: Workflow, **kw: Any) -> Engine:
    return Engine(store, lambda ref: wf, lease_seconds=30, **kw)


async def audit_kinds(store: Store, run_id: str) -> list[str]:
    return [r.kind for r in await store.list_audit(run_id)]


async def test_turn_two_sends_instructions_the_earlier_turn_as_the_model_saw_it_then_the_new(
        store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf, title="Names")
    first = await eng.chat(thread.id, "my name is Ada")
    assert (first.state, first.thread_id, first.turn) == ("succeeded", thread.id, 1)
    assert first.output == "I know: \"noted my name is Ada\""
    seen_by_turn_one = CALLS[-1]  # its last model call: everything the model saw
    second = await eng.chat(thread.id, "what is my name?")
    assert second.turn == 2 and second.output == (
        'I know: "noted my name is Ada"; "noted what is my name?"')
    sent = CALLS[2]  # the first model call of turn 2
    assert sent == [*seen_by_turn_one,
                    Message(role="assistant", content=first.output),
                    Message(role="user", content="what is my name?")]
    assert [m.role for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert sent[2].tool_calls[0].name == "remember"
    steps = await store.list_steps(second.id)
    assert steps[0].input["digest"] == conversation_digest(sent)
    assert EFFECTS == ["my name is Ada", "what is my name?"]  # turn 1's tool did not run again
    assert "history.truncated" not in await audit_kinds(store, second.id)


async def test_a_failed_turn_is_left_out_and_the_audit_says_so(store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf)
    await eng.chat(thread.id, "one")
    failed = await eng.chat(thread.id, "fail")
    assert failed.state == "failed" and failed.turn == 2
    third = await eng.chat(thread.id, "three")
    assert third.output == 'I know: "noted one"; "noted three"'
    users = [m.content for m in CALLS[-1] if m.role == "user"]
    assert users == ["one", "three"]
    [truncated] = [r for r in await store.list_audit(third.id) if r.kind == "history.truncated"]
    assert truncated.data["dropped"] == [
        {"turn": 2, "run_id": failed.id, "reason": "failed", "tokens": 0}]
    assert truncated.data["sent_turns"] == [1]


async def test_the_history_policy_keeps_the_newest_whole_turns_and_audits_the_rest(
        store: Store) -> None:
    wf = make_workflow(HistoryPolicy(max_turns=2))
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf)
    runs = [await eng.chat(thread.id, f"fact {n}") for n in range(1, 5)]
    assert runs[-1].output == 'I know: "noted fact 2"; "noted fact 3"; "noted fact 4"'
    [truncated] = [r for r in await store.list_audit(runs[-1].id)
                   if r.kind == "history.truncated"]
    assert truncated.data["dropped"] == [
        {"turn": 1, "run_id": runs[0].id, "reason": "max_turns",
         "tokens": truncated.data["dropped"][0]["tokens"]}]
    assert truncated.data["sent_turns"] == [2, 3] and truncated.data["max_turns"] == 2
    # max_tokens: only turns that fit whole, newest first
    small = make_workflow(HistoryPolicy(max_tokens=60))
    eng2 = engine_for(store, small)
    t2 = await eng2.create_thread(agent="memo", workflow=small)
    for n in range(1, 4):
        last = await eng2.chat(t2.id, f"fact {n}")
    [cut] = [r for r in await store.list_audit(last.id) if r.kind == "history.truncated"]
    assert cut.data["dropped"][0]["reason"] == "max_tokens"
    assert cut.data["sent_tokens"] <= 60 and cut.data["sent_turns"] == [2]
    none = make_workflow(HistoryPolicy(max_turns=0))
    eng3 = engine_for(store, none)
    t3 = await eng3.create_thread(agent="memo", workflow=none)
    await eng3.chat(t3.id, "a")
    assert (await eng3.chat(t3.id, "b")).output == 'I know: "noted b"'


async def test_a_turn_resumed_after_a_crash_sends_exactly_what_it_sent_before(
        store: Store) -> None:
    armed = {"crash": True}

    @tool
    def remember(fact: str) -> str:  # this workflow's crashing variant
        """Note a fact (the second one crashes the process once)."""
        EFFECTS.append(fact)
        if fact == "two" and armed["crash"]:
            armed["crash"] = False
            raise Crash()
        return f"noted {fact}"

    agent = Agent(name="memo", model=FunctionModel(answer), instructions="Remember.",
                  tools=["remember"])
    wf = Workflow(ref="memo", agents={"memo": agent}, tools=ToolRegistry([remember]))
    eng = Engine(store, lambda ref: wf, owner="host:1:a", lease_seconds=30)
    thread = await eng.create_thread(agent="memo", workflow=wf)
    await eng.chat(thread.id, "one")
    turn2, _ = await eng.send_message(thread.id, "two")
    with pytest.raises(Crash):
        await eng.execute(turn2.id)
    before = CALLS[-1]
    CALLS.clear()
    eng2 = Engine(store, lambda ref: wf, owner="host:2:b", lease_seconds=30)
    done = await eng2.resume(turn2.id, force=True)
    assert done.state == "succeeded" and done.output == 'I know: "noted one"; "noted two"'
    assert len(CALLS) == 1  # the pre-crash model turn was replayed, not asked again
    assert CALLS[0][:len(before)] == before
    steps = await store.list_steps(turn2.id)
    assert steps[0].input["digest"] == conversation_digest(before)
    assert EFFECTS == ["one", "two", "two"]


async def test_a_second_message_while_a_turn_is_unfinished_is_refused(store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf)
    queued, created = await eng.send_message(thread.id, "one", idempotency_key="k1")
    with pytest.raises(TurnInProgress) as refused:
        await eng.send_message(thread.id, "two")
    assert refused.value.run_id == queued.id and "turn 1" in str(refused.value)
    again, created_again = await eng.send_message(thread.id, "one", idempotency_key="k1")
    assert (created, created_again, again.id) == (True, False, queued.id)
    await eng.run_tree(queued.id)
    assert (await eng.chat(thread.id, "two")).turn == 2
    with pytest.raises(NotFound):
        await eng.send_message(thread.id, "x", tenant="someone-else")
    results = await asyncio.gather(*(eng.send_message(thread.id, f"m{n}") for n in range(5)),
                                   return_exceptions=True)
    assert sum(isinstance(r, tuple) for r in results) == 1
    assert sum(isinstance(r, TurnInProgress) for r in results) == 4


async def test_a_thread_budget_is_shared_by_its_turns(store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf, budget={"max_steps": 5})
    first = await eng.chat(thread.id, "one")  # model, tool, model: 3 steps
    assert first.state == "succeeded" and first.ledgers == [first.id, thread.id]
    second = await eng.chat(thread.id, "two")
    assert (second.state, second.error_code) == ("failed", "budget_exceeded")
    ledger = await store.get_ledger(thread.id)
    assert ledger.used["steps"] == 5 and ledger.exhausted == "steps"
    assert (await store.get_ledger(second.id)).used["steps"] == 2  # each turn's own, too


async def test_a_fork_shares_turns_without_running_their_tools_and_outlives_its_source(
        store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf, title="t",
                                     metadata={"k": "v"})
    one = await eng.chat(thread.id, "one")
    await eng.chat(thread.id, "two")
    fork = await eng.fork_thread(thread.id, 1)
    assert (fork.forked_from, fork.forked_turn, fork.title, fork.metadata) == (
        thread.id, 1, "t", {"k": "v"})
    [copy] = await store.list_turns(fork.id)
    assert (copy.turn, copy.input, copy.output, copy.state) == (1, "one", one.output,
                                                                "succeeded")
    assert copy.id != one.id
    assert [r.kind for r in await store.list_audit(copy.id)] == ["run.forked", "state.changed"]
    with pytest.raises(ForkPastEnd, match="has 2 turn"):
        await eng.fork_thread(thread.id, 3)
    await eng.delete_thread(thread.id)
    again = await eng.chat(fork.id, "other two")
    assert again.turn == 2 and again.output == 'I know: "noted one"; "noted other two"'
    assert EFFECTS == ["one", "two", "other two"]  # the shared turn's tool ran once, ever
    assert (await verify_run(store, copy, None)).result.ok


async def test_delete_erases_the_content_and_verification_says_deleted_anchored(
        store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf)
    run = await eng.chat(thread.id, "secret plan")
    ok = await verify_run(store, run, None)
    assert ok.result.ok and ok.anchor is None and ok.result.count > 3
    await eng.delete_thread(thread.id, actor="user:ann")
    erased = await store.get_run(run.id)
    assert erased.input == "" and erased.output is None
    checked = await verify_run(store, erased, None)
    assert checked.result.ok and checked.anchor is not None
    assert checked.anchor.thread_id == thread.id
    chain = await store.list_thread_audit(thread.id)
    assert [r.kind for r in chain] == ["thread.created", "turn.created", "thread.deleted"]
    assert chain[-1].actor == "user:ann" and checked.anchor.seq == 3
    with pytest.raises(NotFound):
        await eng.chat(thread.id, "again")
    # a head that does not match its anchor is tampering, not a deletion
    forged = erased.model_copy(update={"audit_seq": erased.audit_seq + 1})
    bad = await verify_run(store, forged, None)
    assert not bad.result.ok and "not the one anchored" in (bad.result.reason or "")


async def test_a_run_whose_records_vanish_without_a_deletion_is_still_tampered(
        store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    thread = await eng.create_thread(agent="memo", workflow=wf)
    run = await eng.chat(thread.id, "x")
    store._conn.execute("DELETE FROM audit WHERE run_id=?", (run.id,))  # type: ignore[attr-defined]
    bad = await verify_run(store, run, None)
    assert not bad.result.ok and bad.anchor is None


async def test_a_thread_of_an_unknown_agent_is_refused(store: Store) -> None:
    wf = make_workflow()
    eng = engine_for(store, wf)
    with pytest.raises(KeyError, match="unknown agent 'nobody'"):
        await eng.create_thread(agent="nobody", workflow=wf)
    assert await store.list_threads() == []

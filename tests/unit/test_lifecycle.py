"""The lifecycle table, and a property: whatever happens, no run is left orphaned."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from alpaca_engine import doctor
from alpaca_engine.engine import wake_finished_waiters
from alpaca_engine.errors import LeaseLost
from alpaca_engine.lifecycle import (
    TERMINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    RunState,
    check_transition,
)
from alpaca_engine.store.records import RunRecord
from alpaca_engine.store.sqlite import SQLiteStore


def test_terminal_states_have_no_exits():
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset()
        for dst in RunState:
            with pytest.raises(IllegalTransition):
                check_transition("r", state, dst, "x")


def test_failing_states_need_a_reason():
    with pytest.raises(ValueError, match="needs an error code"):
        check_transition("r", RunState.RUNNING, RunState.FAILED)
    check_transition("r", RunState.RUNNING, RunState.FAILED, "tool_error")
    check_transition("r", RunState.RUNNING, RunState.SUCCEEDED)


def test_the_table_matches_the_design():
    legal = {(s, d) for s in RunState for d in TRANSITIONS[s]}
    assert (RunState.QUEUED, RunState.SUCCEEDED) not in legal
    assert (RunState.WAITING, RunState.RUNNING) not in legal
    assert (RunState.RUNNING, RunState.QUEUED) in legal
    assert len(legal) == 3 + 6 + 4


LEASE = 10.0
_ids = itertools.count()


class LifecycleMachine(RuleBasedStateMachine):
    """Random claims, crashes, waits, children, cancels and illegal moves against a real store."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store = SQLiteStore("sqlite:///:memory:")
        self.do(self.store.open())
        self.now = 1000.0
        self.runs: list[str] = []

    def do(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.do(self.store.close())
        self.loop.close()

    def get(self, run_id: str) -> RunRecord:
        return self.do(self.store.get_run(run_id))

    @rule()
    def create(self) -> None:
        rid = f"r{next(_ids)}"
        self.do(self.store.create_run(RunRecord(
            id=rid, agent="a", workflow="w", input="x", root_id=rid,
            created_at=self.now, updated_at=self.now)))
        self.runs.append(rid)

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self.runs))
        self.do(self.store.claim_run(rid, "w", LEASE, self.now))

    @rule(seconds=st.floats(0, 3 * LEASE))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), state=st.sampled_from(sorted(TERMINAL_STATES)))
    def finish(self, data: st.DataObject, state: RunState) -> None:
        run = self.get(data.draw(st.sampled_from(self.runs)))
        if run.state != RunState.RUNNING:
            return
        code = None if state == RunState.SUCCEEDED else "some_error"
        with contextlib.suppress(LeaseLost):
            self.do(self.store.transition(run.id, state, self.now, epoch=run.epoch,
                                          error_code=code, error_message=code))

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def wait_for_child(self, data: st.DataObject) -> None:
        run = self.get(data.draw(st.sampled_from(self.runs)))
        if run.state != RunState.RUNNING or (run.lease_expires_at or 0) < self.now:
            return
        cid = f"r{next(_ids)}"
        self.do(self.store.create_run(RunRecord(
            id=cid, agent="b", workflow="w", input="x", root_id=run.root_id, parent_id=run.id,
            depth=run.depth + 1, created_at=self.now, updated_at=self.now)))
        self.runs.append(cid)
        self.do(self.store.transition(run.id, RunState.WAITING, self.now, epoch=run.epoch))

    @precondition(lambda self: self.runs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.do(self.store.request_cancel(data.draw(st.sampled_from(self.runs))))

    @precondition(lambda self: self.runs)
    @rule(data=st.data(), dst=st.sampled_from(list(RunState)))
    def illegal_move_raises(self, data: st.DataObject, dst: RunState) -> None:
        run = self.get(data.draw(st.sampled_from(self.runs)))
        if dst in TRANSITIONS[run.state]:
            return
        with pytest.raises(IllegalTransition):
            self.do(self.store.transition(run.id, dst, self.now, epoch=run.epoch,
                                          error_code="x"))
        assert self.get(run.id).state == run.state

    @invariant()
    def no_orphans_after_reaping(self) -> None:
        self.do(self.store.requeue_expired(self.now))
        self.do(wake_finished_waiters(self.store, self.now))
        report = self.do(doctor.check(self.store, self.now))
        assert report.orphans == []
        for rid in self.runs:
            run = self.get(rid)
            if run.state in (RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT):
                assert run.error_code


LifecycleMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                              deadline=None)
TestLifecycle = LifecycleMachine.TestCase

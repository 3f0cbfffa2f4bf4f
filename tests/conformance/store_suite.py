"""The shared store conformance suite. Each backend subclasses ``StoreConformance`` and
provides a ``store`` fixture yielding an open, empty store."""

from __future__ import annotations

import asyncio

import pytest

from alpaca_engine.budget import BudgetExceeded
from alpaca_engine.errors import ApprovalConflict, LeaseLost, NotFound, TurnInProgress
from alpaca_engine.lifecycle import IllegalTransition, RunState
from alpaca_engine.store.base import StepWrite
from alpaca_engine.store.records import (
    ApiKeyRecord,
    ApprovalRecord,
    AuditEvent,
    LedgerRecord,
    RunRecord,
    StepRecord,
    ThreadRecord,
    TurnCopy,
    WorkflowRecord,
)
from alpaca_engine.telemetry.audit import verify_chain


def new_run(rid: str, *, tenant: str = "t1", key: str | None = None, parent: str | None = None,
            at: float = 100.0) -> RunRecord:
    return RunRecord(id=rid, tenant=tenant, agent="a", workflow="w", input="hello",
                     root_id=rid if parent is None else "root", parent_id=parent,
                     idempotency_key=key, created_at=at, updated_at=at,
                     ancestry=["a"], budget={"max_steps": 5})


class StoreConformance:
    @staticmethod
    def same_record(returned: RunRecord, stored: RunRecord) -> None:
        """Equal fields; a backend's suite may ask for more (the same types, JSON text)."""
        assert returned.model_dump() == stored.model_dump()

    async def test_create_and_get_round_trip(self, store):
        run, created = await store.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        assert created
        got = await store.get_run("r1")
        assert got.model_dump() == run.model_dump()
        assert got.state == RunState.QUEUED and got.budget == {"max_steps": 5}

    async def test_tenant_isolation_answers_not_found(self, store):
        await store.create_run(new_run("r1", tenant="t1"))
        with pytest.raises(NotFound):
            await store.get_run("r1", tenant="t2")
        with pytest.raises(NotFound):
            await store.get_run("nope")
        assert [r.id for r in await store.list_runs(tenant="t2")] == []

    async def test_idempotency_key_returns_the_same_run(self, store):
        _first, c1 = await store.create_run(new_run("r1", key="k"))
        second, c2 = await store.create_run(new_run("r2", key="k"))
        other, c3 = await store.create_run(new_run("r3", key="k", tenant="t2"))
        assert (c1, c2, c3) == (True, False, True)
        assert second.id == "r1" and other.id == "r3"

    async def test_list_filters_and_order(self, store):
        await store.create_run(new_run("a", at=1))
        await store.create_run(new_run("b", at=2))
        await store.create_run(new_run("c", parent="a", at=3))
        assert [r.id for r in await store.list_runs()] == ["c", "b", "a"]
        assert [r.id for r in await store.list_runs(parent_id="a")] == ["c"]
        assert [r.id for r in await store.list_runs(limit=1)] == ["c"]
        await store.claim_run("a", "w", 10, 5)
        assert [r.id for r in await store.list_runs(state=RunState.RUNNING)] == ["a"]

    async def test_claim_bumps_epoch_and_only_once(self, store):
        await store.create_run(new_run("r1"))
        claimed = await store.claim_run("r1", "w1", 10, 100)
        assert claimed and claimed.state == RunState.RUNNING and claimed.epoch == 1
        assert claimed.lease_owner == "w1" and claimed.lease_expires_at == 110
        assert await store.claim_run("r1", "w2", 10, 105) is None
        stolen = await store.claim_run("r1", "w2", 10, 111)  # lease expired
        assert stolen and stolen.epoch == 2 and stolen.lease_owner == "w2"

    async def test_a_claim_and_a_transition_return_the_run_as_stored(self, store):
        """What a claim or a transition returns is what a read of the run gives (see
        :meth:`same_record`)."""
        await store.create_run(new_run("r1"))
        await store.create_run(new_run("r2"))

        async def same(returned: RunRecord | None) -> RunRecord:
            assert returned is not None
            self.same_record(returned, await store.get_run(returned.id))
            return returned

        run = await same(await store.claim_run("r1", "w1", 10, 100))
        run = await same(await store.claim_run("r1", "w2", 10, 111))  # lease expired
        run = await same(await store.transition("r1", RunState.WAITING, 112, epoch=run.epoch,
                                                usage={"steps": 2, "cost": 0.5}))
        await same(await store.transition("r1", RunState.QUEUED, 113))
        run = await same(await store.claim_run("r1", "w1", 10.5, 114.25))
        run = await same(await store.transition("r1", RunState.QUEUED, 115, epoch=run.epoch))
        run = await same(await store.transition("r1", RunState.RUNNING, 116, epoch=run.epoch))
        await same(await store.transition("r1", RunState.SUCCEEDED, 117, epoch=run.epoch,
                                          output='{"a": 1}', usage={"nested": {"k": [1, 2]}}))
        run = await same(await store.claim_run("r2", "w1", 10, 100))
        await same(await store.transition("r2", RunState.FAILED, 101, epoch=run.epoch,
                                          error_code="tool_error", error_message="boom"))

    async def test_claim_next_takes_oldest_queued(self, store):
        await store.create_run(new_run("new", at=2))
        await store.create_run(new_run("old", at=1))
        first = await store.claim_next("w", 10, 5)
        second = await store.claim_next("w", 10, 5)
        assert (first.id, second.id) == ("old", "new")
        assert await store.claim_next("w", 10, 5) is None

    async def test_fencing_refuses_stale_epochs(self, store):
        await store.create_run(new_run("r1"))
        old = await store.claim_run("r1", "w1", 10, 100)
        new = await store.claim_run("r1", "w2", 10, 100, steal=True)
        step = StepRecord(run_id="r1", seq=1, kind="tool", name="t")
        with pytest.raises(LeaseLost):
            await store.save_step(step, old.epoch)
        with pytest.raises(LeaseLost):
            await store.transition("r1", RunState.SUCCEEDED, 101, epoch=old.epoch)
        with pytest.raises(LeaseLost):
            await store.renew_lease("r1", "w1", old.epoch, 10, 101)
        with pytest.raises(LeaseLost):
            await store.append_audit("r1", [AuditEvent(kind="x")], 101, epoch=old.epoch)
        await store.save_step(step, new.epoch)
        await store.renew_lease("r1", "w2", new.epoch, 10, 101)
        assert (await store.get_run("r1")).lease_expires_at == 111

    async def test_steps_upsert_and_order(self, store):
        await store.create_run(new_run("r1"))
        run = await store.claim_run("r1", "w", 10, 100)
        for seq in (2, 1):
            await store.save_step(StepRecord(run_id="r1", seq=seq, kind="model", name="m",
                                             input={"n": seq}, started_at=100), run.epoch)
        done = StepRecord(run_id="r1", seq=1, kind="model", name="m", status="completed",
                          input={"n": 1}, output={"content": "hi", "list": [1, 2]},
                          attempts=2, started_at=100, finished_at=101)
        await store.save_step(done, run.epoch)
        steps = await store.list_steps("r1")
        assert [(s.seq, s.status) for s in steps] == [(1, "completed"), (2, "started")]
        assert steps[0].output == {"content": "hi", "list": [1, 2]} and steps[0].attempts == 2

    async def test_transitions_follow_the_table(self, store):
        await store.create_run(new_run("r1"))
        with pytest.raises(IllegalTransition):
            await store.transition("r1", RunState.SUCCEEDED, 100)
        run = await store.claim_run("r1", "w", 10, 100)
        done = await store.transition("r1", RunState.FAILED, 101, epoch=run.epoch,
                                      error_code="tool_error", error_message="boom",
                                      usage={"steps": 3})
        assert done.state == RunState.FAILED and done.error_code == "tool_error"
        assert done.usage == {"steps": 3} and done.lease_owner is None
        with pytest.raises(IllegalTransition):
            await store.transition("r1", RunState.QUEUED, 102, epoch=run.epoch)

    async def test_a_typed_output_keeps_its_type(self, store):
        await store.create_run(new_run("r1"))
        await store.create_run(new_run("r2"))
        assert (await store.get_run("r1")).output_type == "text"
        for rid, output, kind in (("r1", '{"a":[1,2]}', "json"), ("r2", "plain", None)):
            run = await store.claim_run(rid, "w", 10, 100)
            await store.transition(rid, RunState.SUCCEEDED, 101, epoch=run.epoch,
                                   output=output, output_type=kind)
        typed, plain = await store.get_run("r1"), await store.get_run("r2")
        assert (typed.output_type, typed.value) == ("json", {"a": [1, 2]})
        assert (plain.output_type, plain.value) == ("text", "plain")
        assert [r.output_type for r in await store.list_runs()] == ["text", "json"]

    async def test_a_move_returns_the_run_as_stored(self, store):
        await store.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        run = await store.claim_run("r1", "w", 10, 100)
        paused = await store.transition("r1", RunState.WAITING, 101, epoch=run.epoch,
                                        usage={"steps": 1})
        assert paused == await store.get_run("r1")
        await store.transition("r1", RunState.QUEUED, 102)
        run = await store.claim_run("r1", "w", 10, 103)
        done = await store.transition("r1", RunState.SUCCEEDED, 104.25, epoch=run.epoch,
                                      output='{"a":[1,2]}', output_type="json",
                                      usage={"steps": 2, "cost": 0.000125})
        assert done == await store.get_run("r1")
        assert (done.output_type, done.value) == ("json", {"a": [1, 2]})
        await store.create_run(new_run("r2"))
        cancelled = await store.request_cancel("r2")  # a move without a lease
        assert cancelled == await store.get_run("r2") and cancelled.state == "cancelled"
        await store.create_run(new_run("r3"))
        run = await store.claim_run("r3", "w", 10, 100)
        failed = await store.transition("r3", RunState.FAILED, 105, epoch=run.epoch,
                                        error_code="tool_error", error_message="boom")
        assert failed == await store.get_run("r3")
        assert isinstance(failed.updated_at, float) and failed.lease_owner is None

    async def test_cancel(self, store):
        await store.create_run(new_run("q"))
        await store.create_run(new_run("r"))
        assert (await store.request_cancel("q")).state == RunState.CANCELLED
        await store.claim_run("r", "w", 10, 100)
        flagged = await store.request_cancel("r")
        assert flagged.state == RunState.RUNNING and flagged.cancel_requested
        with pytest.raises(NotFound):
            await store.request_cancel("q", tenant="other")

    async def test_requeue_expired_leases(self, store):
        await store.create_run(new_run("r1"))
        run = await store.claim_run("r1", "w", 10, 100)
        assert await store.requeue_expired(105) == []
        assert await store.requeue_expired(111) == ["r1"]
        requeued = await store.get_run("r1")
        assert requeued.state == RunState.QUEUED and requeued.epoch > run.epoch

    async def test_audit_chain_is_written_with_the_change_and_verifies(self, store):
        await store.create_run(new_run("r1"), [AuditEvent(kind="run.created", data={"x": 1})])
        run = await store.claim_run("r1", "w", 10, 100)
        await store.save_step(StepRecord(run_id="r1", seq=1, kind="tool", name="t"), run.epoch,
                              [AuditEvent(kind="tool.chosen", data={"tool": "t"})])
        await store.transition("r1", RunState.SUCCEEDED, 102, epoch=run.epoch)
        records = await store.list_audit("r1")
        assert [r.kind for r in records] == [
            "run.created", "state.changed", "tool.chosen", "state.changed"]
        assert [r.seq for r in records] == [1, 2, 3, 4]
        assert verify_chain(records, key=store.audit_key).ok
        assert [r.seq for r in await store.list_audit("r1", after_seq=2)] == [3, 4]

    async def test_a_terminal_transition_closes_steps_left_started(self, store):
        await store.create_run(new_run("r1"))
        run = await store.claim_run("r1", "w", 10, 100)
        for seq, status in ((1, "completed"), (2, "started")):
            await store.save_step(StepRecord(run_id="r1", seq=seq, kind="tool", name="t",
                                             status=status, started_at=100), run.epoch)
        await store.transition("r1", RunState.WAITING, 101, epoch=run.epoch)
        assert [s.status for s in await store.list_steps("r1")] == ["completed", "started"]
        assert (await store.request_cancel("r1")).state == RunState.CANCELLED
        done, closed = await store.list_steps("r1")
        assert done.status == "completed" and done.error is None
        assert closed.status == "failed" and closed.finished_at is not None
        assert closed.error == {"code": "cancelled",
                                "message": "the run ended cancelled before this step finished"}

    async def test_failed_write_leaves_no_audit(self, store):
        await store.create_run(new_run("r1"))
        with pytest.raises(IllegalTransition):
            await store.transition("r1", RunState.SUCCEEDED, 100,
                                   audit=[AuditEvent(kind="should.not.exist")])
        assert "should.not.exist" not in [r.kind for r in await store.list_audit("r1")]

    # -- the chain head on the run row; a finished run's chain is closed (DESIGN §7) ----------

    async def test_run_row_carries_the_chain_head(self, store):
        created, _ = await store.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        assert created.audit_seq == 1
        assert (await store.get_run("r1")).audit_head == created.audit_head
        run = await store.claim_run("r1", "w", 10, 100)
        assert run.audit_seq == 2
        await store.save_step(StepRecord(run_id="r1", seq=1, kind="tool", name="t"), run.epoch,
                              [AuditEvent(kind="tool.chosen"), AuditEvent(kind="tool.result")])
        done = await store.transition("r1", RunState.SUCCEEDED, 102, epoch=run.epoch)
        records = await store.list_audit("r1")
        assert done.audit_head == (await store.get_run("r1")).audit_head
        assert done.audit_head == (5, records[-1].hash)
        assert verify_chain(records, key=store.audit_key, head=done.audit_head,
                            terminal_state="succeeded").ok
        short = verify_chain(records[:3], key=store.audit_key, head=done.audit_head)
        assert not short.ok and short.first_bad_seq == 4 and "deleted" in short.reason
        gone = verify_chain([], key=store.audit_key, head=done.audit_head)
        assert not gone.ok and gone.first_bad_seq == 1 and "missing" in gone.reason

    async def test_a_finished_run_takes_no_more_journal_writes(self, store):
        await store.create_run(new_run("r1"))
        run = await store.claim_run("r1", "w", 10, 100)
        await store.transition("r1", RunState.FAILED, 101, epoch=run.epoch,
                               error_code="tool_error", error_message="boom")
        with pytest.raises(LeaseLost):
            await store.save_step(StepRecord(run_id="r1", seq=1, kind="tool", name="t"),
                                  run.epoch, [AuditEvent(kind="late")])
        with pytest.raises(LeaseLost):
            await store.append_audit("r1", [AuditEvent(kind="late")], 102, epoch=run.epoch)
        with pytest.raises(LeaseLost):
            await store.append_audit("r1", [AuditEvent(kind="late")], 102)
        with pytest.raises(LeaseLost):
            await store.create_approval(ApprovalRecord(
                id="a1", tenant="t1", run_id="r1", root_id="r1", step=2, action="x",
                created_at=102), run.epoch, [AuditEvent(kind="late")])
        assert (await store.request_cancel("r1")).state == RunState.FAILED
        final = await store.get_run("r1")
        records = await store.list_audit("r1")
        assert records[-1].kind == "state.changed" and records[-1].data["to"] == "failed"
        assert verify_chain(records, key=store.audit_key, head=final.audit_head,
                            terminal_state="failed").ok

    async def test_a_cancelled_runs_approval_is_closed_without_touching_its_chain(self, store):
        await store.create_run(new_run("r1"))
        run = await store.claim_run("r1", "w", 10, 100)
        for aid, step in (("a1", 2), ("a2", 3)):
            await store.create_approval(ApprovalRecord(
                id=aid, tenant="t1", run_id="r1", root_id="r1", step=step, action="x",
                created_at=100, expires_at=150), run.epoch)
        await store.transition("r1", RunState.WAITING, 101, epoch=run.epoch)
        assert (await store.request_cancel("r1")).state == RunState.CANCELLED
        with pytest.raises(ApprovalConflict, match="cancelled"):
            await store.decide_approval("a1", approve=True, by="sue", comment=None, now=102)
        assert (await store.get_approval("a1")).status == "pending"
        assert [a.id for a in await store.expire_approvals(151)] == ["a1", "a2"]
        final = await store.get_run("r1")
        records = await store.list_audit("r1")
        assert records[-1].kind == "state.changed" and records[-1].data["to"] == "cancelled"
        assert verify_chain(records, key=store.audit_key, head=final.audit_head,
                            terminal_state="cancelled").ok

    # -- one owner; crash-loop quarantine (DESIGN §3) -----------------------------------------

    async def test_a_steal_takes_only_the_lease_it_judged_dead(self, store):
        await store.create_run(new_run("r1"))
        dead = await store.claim_run("r1", "w1", 10, 100)
        first = await store.claim_run("r1", "w2", 10, 101, steal=True, expected_epoch=dead.epoch)
        assert first is not None and first.lease_owner == "w2" and first.crash_count == 1
        late = await store.claim_run("r1", "w3", 10, 101, steal=True, expected_epoch=dead.epoch)
        assert late is None  # w2 took it since: a live owner is never preempted
        now = await store.get_run("r1")
        assert (now.lease_owner, now.epoch) == ("w2", first.epoch)

    async def test_crash_recoveries_are_counted_then_quarantined(self, store):
        await store.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        run = await store.claim_run("r1", "w1", 10, 100)
        assert await store.requeue_expired(111, max_attempts=3) == ["r1"]  # crash 1
        assert (await store.get_run("r1")).crash_count == 1
        run = await store.claim_run("r1", "w2", 10, 112, max_attempts=3)
        assert run.crash_count == 1  # a claim of a queued run is no crash
        # crash 2: a claim takes the expired lease over
        run = await store.claim_run("r1", "w3", 10, 123, max_attempts=3)
        assert run is not None and run.crash_count == 2
        assert await store.requeue_expired(134, max_attempts=3) == []  # crash 3: quarantined
        failed = await store.get_run("r1")
        assert failed.state == RunState.FAILED and failed.error_code == "crash_loop"
        assert "3 times" in failed.error_message and failed.lease_owner is None
        assert await store.claim_run("r1", "w4", 10, 135, steal=True) is None
        records = await store.list_audit("r1")
        assert [r.kind for r in records[-2:]] == ["run.quarantined", "state.changed"]
        assert records[-2].data["crash_count"] == 3 and records[-2].data["max_attempts"] == 3
        assert verify_chain(records, key=store.audit_key, head=failed.audit_head,
                            terminal_state="failed").ok

    async def test_a_claim_of_a_crash_looping_run_quarantines_it(self, store):
        await store.create_run(new_run("r1"))
        await store.claim_run("r1", "w1", 10, 100)
        assert await store.claim_run("r1", "w2", 10, 111, max_attempts=1) is None
        failed = await store.get_run("r1")
        assert (failed.state, failed.error_code, failed.crash_count) == (
            RunState.FAILED, "crash_loop", 1)

    async def test_legitimate_reclaims_are_not_crashes(self, store):
        await store.create_run(new_run("r1"))
        run = await store.claim_run("r1", "w1", 10, 100, max_attempts=1)
        waiting = await store.transition("r1", RunState.WAITING, 101, epoch=run.epoch)
        await store.transition("r1", RunState.QUEUED, 102, epoch=waiting.epoch)  # woken
        run = await store.claim_run("r1", "w2", 10, 103, max_attempts=1)
        await store.transition("r1", RunState.QUEUED, 104, epoch=run.epoch)  # released
        run = await store.claim_run("r1", "w3", 10, 105, max_attempts=1)
        assert run is not None and run.state == RunState.RUNNING and run.crash_count == 0


class LedgerApprovalKeyConformance:
    """Budget ledgers, approvals and API keys (part of every store's contract)."""

    async def _leased(self, store, rid: str = "r1", limits=None):  # type: ignore[no-untyped-def]
        run = new_run(rid).model_copy(update={"ledgers": [rid]})
        await store.create_run(run, ledger=LedgerRecord(id=rid, limits=limits or {}))
        return await store.claim_run(rid, "w", 10, 100)

    async def test_reserve_settle_and_refuse(self, store):
        run = await self._leased(store, limits={"tool_calls": 2, "tokens": 100})
        for seq in (1, 2):
            await store.save_step(StepRecord(run_id="r1", seq=seq, kind="tool", name="t"),
                                  run.epoch, reserve={"tool_calls": 1, "tokens": 10})
        await store.save_step(StepRecord(run_id="r1", seq=1, kind="tool", name="t",
                                         status="completed"), run.epoch, settle={"tokens": 5})
        ledger = await store.get_ledger("r1")
        assert ledger.used == {"tool_calls": 2, "tokens": 25}
        with pytest.raises(BudgetExceeded) as info:
            await store.save_step(StepRecord(run_id="r1", seq=3, kind="tool", name="t"),
                                  run.epoch, reserve={"tool_calls": 1})
        assert info.value.resource == "tool_calls"
        assert [s.seq for s in await store.list_steps("r1")] == [1, 2]  # nothing written
        exhausted = await store.get_ledger("r1")
        assert exhausted.exhausted == "tool_calls" and exhausted.used == ledger.used
        with pytest.raises(BudgetExceeded):  # an exhausted ledger refuses everything after
            await store.save_step(StepRecord(run_id="r1", seq=3, kind="model", name="m"),
                                  run.epoch, reserve={"tokens": 1})

    async def test_a_settlement_past_the_limit_is_recorded_and_exhausts_the_ledger(self, store):
        run = await self._leased(store, limits={"tokens": 100})
        step = StepRecord(run_id="r1", seq=1, kind="model", name="m")
        await store.save_step(step, run.epoch, reserve={"tokens": 60})
        done = step.model_copy(update={"status": "completed", "output": {"content": "long"}})
        with pytest.raises(BudgetExceeded) as info:
            await store.save_step(done, run.epoch, settle={"tokens": 210},
                                  audit=[AuditEvent(kind="model.output")])
        assert info.value.resource == "tokens"
        ledger = await store.get_ledger("r1")
        assert ledger.used == {"tokens": 270} and ledger.exhausted == "tokens"
        [saved] = await store.list_steps("r1")  # the step and its audit were written
        assert saved.status == "completed" and saved.output == {"content": "long"}
        assert "model.output" in [r.kind for r in await store.list_audit("r1")]
        with pytest.raises(BudgetExceeded):  # and the tree can reserve nothing more
            await store.save_step(StepRecord(run_id="r1", seq=2, kind="model", name="m"),
                                  run.epoch, reserve={"tokens": 1})

    async def test_a_step_reserves_once_even_when_saved_again(self, store):
        run = await self._leased(store, limits={"steps": 1})
        step = StepRecord(run_id="r1", seq=1, kind="tool", name="t")
        await store.save_step(step, run.epoch, reserve={"steps": 1})
        await store.save_step(step, run.epoch, reserve={"steps": 1})  # replay after a crash
        assert (await store.get_ledger("r1")).used == {"steps": 1}
        [saved] = await store.list_steps("r1")
        assert saved.reserved == {"steps": 1}

    async def test_a_step_reserves_once_whatever_the_steps_around_it(self, store):
        """A started step saved again (a replay) is not debited again, whether later steps
        have rows or it was written earlier in the same batch; a new step is."""
        run = await self._leased(store, limits={"steps": 10})

        def started(seq: int) -> StepWrite:
            return StepWrite(StepRecord(run_id="r1", seq=seq, kind="tool", name="t"),
                             reserve={"steps": 1})

        await store.save_steps([started(1), started(2)], run.epoch)
        await store.save_steps([started(1), started(3)], run.epoch)
        assert (await store.get_ledger("r1")).used == {"steps": 3}
        await store.save_steps([started(5), started(5), started(4)], run.epoch)
        assert (await store.get_ledger("r1")).used == {"steps": 5}
        steps = await store.list_steps("r1")
        assert [(s.seq, s.reserved) for s in steps] == [(n, {"steps": 1}) for n in range(1, 6)]

    async def test_reservations_debit_every_ledger_of_the_chain(self, store):
        root = await self._leased(store, "root", limits={"steps": 10})
        child = new_run("root.2", parent="root").model_copy(
            update={"ledgers": ["root", "root.2"]})
        await store.create_run(child, ledger=LedgerRecord(id="root.2", limits={"steps": 1}))
        leased = await store.claim_run("root.2", "w", 10, 100)
        await store.save_step(StepRecord(run_id="root.2", seq=1, kind="tool", name="t"),
                              leased.epoch, reserve={"steps": 1})
        with pytest.raises(BudgetExceeded) as info:
            await store.save_step(StepRecord(run_id="root.2", seq=2, kind="tool", name="t"),
                                  leased.epoch, reserve={"steps": 1})
        assert info.value.ledger_id == "root.2"
        assert (await store.get_ledger("root")).used == {"steps": 1}
        assert (await store.get_ledger("root")).exhausted is None
        assert root is not None

    async def _outcome_and_next(self, store, run, *, settle=None, reserve=None):  # type: ignore[no-untyped-def]
        """Step 1 started; its outcome and step 2's start as one save_steps call."""
        first = StepRecord(run_id=run.id, seq=1, kind="model", name="m")
        await store.save_step(first, run.epoch, [AuditEvent(kind="budget.reserved")],
                              reserve={"tokens": 10})
        done = first.model_copy(update={"status": "completed", "output": {"content": "x"},
                                        "finished_at": 101.0})
        nxt = StepRecord(run_id=run.id, seq=2, kind="tool", name="t", started_at=101.0)
        return [StepWrite(done, [AuditEvent(kind="model.output", data={"step": 1})],
                          settle=settle),
                StepWrite(nxt, [AuditEvent(kind="budget.reserved", data={"step": 2})],
                          reserve=reserve or {"tool_calls": 1})]

    async def test_an_outcome_and_the_next_start_are_written_together(self, store):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._outcome_and_next(store, run, settle={"tokens": -4})
        done = await store.save_steps(writes, run.epoch)
        assert not done.skipped
        assert done.flags is None or done.flags == type(done.flags)(run.epoch, False)
        steps = await store.list_steps("r1")
        assert [(s.seq, str(s.status)) for s in steps] == [(1, "completed"), (2, "started")]
        assert steps[0].output == {"content": "x"} and steps[1].reserved == {"tool_calls": 1}
        assert (await store.get_ledger("r1")).used == {"tokens": 6, "tool_calls": 1}
        records = await store.list_audit("r1")
        assert [r.kind for r in records][-3:] == ["budget.reserved", "model.output",
                                                  "budget.reserved"]
        head = (await store.get_run("r1")).audit_head
        assert verify_chain(records, key=store.audit_key, head=head).ok
        # and the next single write follows the chain the batch left
        await store.save_step(steps[1].model_copy(update={"status": "completed"}), run.epoch,
                              [AuditEvent(kind="tool.result")])
        records = await store.list_audit("r1")
        assert verify_chain(records, key=store.audit_key,
                            head=(await store.get_run("r1")).audit_head).ok

    async def test_a_cancel_request_stops_the_next_start_but_not_the_outcome(self, store):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._outcome_and_next(store, run)
        await store.request_cancel("r1")
        done = await store.save_steps(writes, run.epoch, unless_cancelled=True)
        assert done.skipped
        steps = await store.list_steps("r1")
        assert [(s.seq, str(s.status)) for s in steps] == [(1, "completed")]
        assert (await store.get_ledger("r1")).used == {"tokens": 10}  # step 2 reserved nothing
        assert "model.output" in [r.kind for r in await store.list_audit("r1")]
        # without a cancel request, unless_cancelled writes everything
        other = await self._leased(store, "r2", limits={"tokens": 100, "tool_calls": 5})
        writes = await self._outcome_and_next(store, other)
        assert not (await store.save_steps(writes, other.epoch, unless_cancelled=True)).skipped
        assert len(await store.list_steps("r2")) == 2

    async def test_an_outcome_after_another_actors_append_is_still_chained(self, store):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._outcome_and_next(store, run)
        await store.append_audit("r1", [AuditEvent(kind="approval.decided", actor="user:x")],
                                 100.5)
        await store.save_steps(writes, run.epoch)
        assert len(await store.list_steps("r1")) == 2
        records = await store.list_audit("r1")
        assert [r.kind for r in records][-3:] == ["approval.decided", "model.output",
                                                  "budget.reserved"]
        assert verify_chain(records, key=store.audit_key,
                            head=(await store.get_run("r1")).audit_head).ok

    @pytest.mark.parametrize(("limits", "change", "resource", "used"), [
        # the next start's reservation is refused: the outcome before it stays written
        ({"tokens": 100, "tool_calls": 1}, {"reserve": {"tool_calls": 2}}, "tool_calls",
         {"tokens": 10}),
        # the outcome overspends: written with its usage, nothing after it
        ({"tokens": 100, "tool_calls": 5}, {"settle": {"tokens": 150}}, "tokens",
         {"tokens": 160}),
    ], ids=["refused-start", "overspent-outcome"])
    async def test_a_budget_stop_keeps_the_outcome_and_writes_nothing_after(
            self, store, limits, change, resource, used):  # type: ignore[no-untyped-def]
        run = await self._leased(store, limits=limits)
        writes = await self._outcome_and_next(store, run, **change)
        with pytest.raises(BudgetExceeded) as info:
            await store.save_steps(writes, run.epoch)
        assert info.value.resource == resource
        steps = await store.list_steps("r1")
        assert [(s.seq, str(s.status)) for s in steps] == [(1, "completed")]
        ledger = await store.get_ledger("r1")
        assert ledger.exhausted == resource
        assert {k: v for k, v in ledger.used.items() if v} == used

    async def test_a_batch_with_a_stale_epoch_writes_nothing(self, store):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._outcome_and_next(store, run)
        before = await store.list_audit("r1")
        with pytest.raises(LeaseLost):
            await store.save_steps(writes, run.epoch + 1)
        assert [str(s.status) for s in await store.list_steps("r1")] == ["started"]
        assert len(await store.list_audit("r1")) == len(before)

    # -- the last outcomes and the run's move in one commit (Store.transition's steps) ------

    async def _last_outcome(self, store, run, *, settle=None):  # type: ignore[no-untyped-def]
        """Step 1 (a model turn) started; its outcome as the write to end the run with."""
        writes = await self._outcome_and_next(store, run, settle=settle)
        return writes[:1]

    @pytest.mark.parametrize("to", [RunState.SUCCEEDED, RunState.WAITING])
    async def test_the_last_outcome_and_the_move_are_written_together(self, store, to):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._last_outcome(store, run, settle={"tokens": -4})
        done = await store.transition(
            "r1", to, 102, epoch=run.epoch, usage={"steps": 1}, steps=writes,
            output="x" if to.terminal else None,
            audit=[] if to.terminal else [AuditEvent(kind="run.paused")])
        assert done.state == to and done == await store.get_run("r1")
        [step] = await store.list_steps("r1")
        assert (str(step.status), step.output) == ("completed", {"content": "x"})
        assert (await store.get_ledger("r1")).used == {"tokens": 6}
        records = await store.list_audit("r1")
        tail = ["model.output", *([] if to.terminal else ["run.paused"]), "state.changed"]
        assert [r.kind for r in records][-len(tail):] == tail
        assert records[-1].data["to"] == str(to)
        assert verify_chain(records, key=store.audit_key, head=done.audit_head,
                            terminal_state=str(to) if to.terminal else None).ok
        if to.terminal:  # the chain is closed: nothing more can be written
            with pytest.raises(LeaseLost):
                await store.save_steps(writes, run.epoch)

    async def test_the_move_follows_another_actors_append(self, store):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._last_outcome(store, run)
        await store.append_audit("r1", [AuditEvent(kind="cancel.requested", actor="user")],
                                 101.5)
        done = await store.transition("r1", RunState.CANCELLED, 102, epoch=run.epoch,
                                      error_code="cancelled", error_message="cancelled",
                                      steps=writes)
        assert str((await store.list_steps("r1"))[0].status) == "completed"
        records = await store.list_audit("r1")
        assert [r.kind for r in records][-3:] == ["cancel.requested", "model.output",
                                                  "state.changed"]
        assert verify_chain(records, key=store.audit_key, head=done.audit_head,
                            terminal_state="cancelled").ok

    @pytest.mark.parametrize(("limits", "change", "resource"), [
        # the second write's reservation is refused: the outcome before it stays written
        ({"tokens": 100, "tool_calls": 1}, {"reserve": {"tool_calls": 2}}, "tool_calls"),
        # the outcome overspends: written with its usage, nothing after it
        ({"tokens": 100, "tool_calls": 5}, {"settle": {"tokens": 150}}, "tokens"),
    ], ids=["refused-write", "overspent-outcome"])
    async def test_a_refused_write_keeps_the_ones_before_and_makes_no_move(
            self, store, limits, change, resource):  # type: ignore[no-untyped-def]
        run = await self._leased(store, limits=limits)
        writes = await self._outcome_and_next(store, run, **change)
        with pytest.raises(BudgetExceeded) as info:
            await store.transition("r1", RunState.SUCCEEDED, 102, epoch=run.epoch,
                                   output="x", steps=writes)
        assert info.value.resource == resource
        steps = await store.list_steps("r1")
        assert [(s.seq, str(s.status)) for s in steps] == [(1, "completed")]
        assert (await store.get_ledger("r1")).exhausted == resource
        after = await store.get_run("r1")
        assert after.state == RunState.RUNNING and after.output is None
        records = await store.list_audit("r1")
        assert records[-1].kind == "model.output"
        assert verify_chain(records, key=store.audit_key, head=after.audit_head).ok
        # the runner ends the run next, as it does after a refused journal write
        failed = await store.transition("r1", RunState.FAILED, 103, epoch=run.epoch,
                                        error_code="budget_exceeded", error_message="over")
        assert verify_chain(await store.list_audit("r1"), key=store.audit_key,
                            head=failed.audit_head, terminal_state="failed").ok

    async def test_a_move_with_a_stale_epoch_writes_nothing(self, store):
        run = await self._leased(store, limits={"tokens": 100, "tool_calls": 5})
        writes = await self._last_outcome(store, run)
        before = await store.list_audit("r1")
        with pytest.raises(LeaseLost):
            await store.transition("r1", RunState.SUCCEEDED, 102, epoch=run.epoch + 1,
                                   output="x", steps=writes)
        assert [str(s.status) for s in await store.list_steps("r1")] == ["started"]
        assert len(await store.list_audit("r1")) == len(before)
        after = await store.get_run("r1")
        assert after.state == RunState.RUNNING and after.output is None
        assert (await store.get_ledger("r1")).used == {"tokens": 10}

    async def test_approval_lifecycle(self, store):
        run = await self._leased(store)
        approval = ApprovalRecord(id="a1", tenant="t1", run_id="r1", root_id="r1", step=2,
                                  action="notify", arguments={"text": "hi"}, reason="policy",
                                  requested_by="agent:a", created_at=101, expires_at=200)
        await store.create_approval(approval, run.epoch, [AuditEvent(kind="approval.requested")])
        again = await store.create_approval(approval.model_copy(update={"id": "a2"}), run.epoch)
        assert again.id == "a1"  # one approval per step
        await store.transition("r1", RunState.WAITING, 102, epoch=run.epoch)
        assert [a.id for a in await store.list_approvals(tenant="t1", status="pending")] == ["a1"]
        assert await store.list_approvals(tenant="t2") == []
        with pytest.raises(NotFound):
            await store.decide_approval("a1", approve=True, by="eve", comment=None, now=103,
                                        tenant="t2")
        decided = await store.decide_approval("a1", approve=True, by="sue", comment="ok",
                                              now=103, tenant="t1")
        assert decided.status == "approved" and decided.decided_by == "sue"
        assert (await store.get_run("r1")).state == RunState.QUEUED
        stored = await store.get_step_approval("r1", 2)
        assert stored and stored.arguments == {"text": "hi"} and stored.comment == "ok"
        with pytest.raises(ApprovalConflict):
            await store.decide_approval("a1", approve=False, by="sue", comment=None, now=104)
        kinds = [r.kind for r in await store.list_audit("r1")]
        assert "approval.requested" in kinds and "approval.decided" in kinds
        assert verify_chain(await store.list_audit("r1"), key=store.audit_key).ok

    async def test_approvals_expire(self, store):
        run = await self._leased(store)
        await store.create_approval(ApprovalRecord(
            id="a1", tenant="t1", run_id="r1", root_id="r1", step=2, action="x",
            created_at=100, expires_at=150), run.epoch)
        await store.transition("r1", RunState.WAITING, 101, epoch=run.epoch)
        assert await store.expire_approvals(149) == []
        [expired] = await store.expire_approvals(151)
        assert expired.id == "a1" and expired.status == "expired"
        assert (await store.get_approval("a1")).status == "expired"
        assert (await store.get_run("r1")).state == RunState.QUEUED
        with pytest.raises(NotFound):
            await store.get_approval("a1", tenant="t2")

    async def test_api_keys(self, store):
        key = ApiKeyRecord(id="k1", tenant="t1", role="supervisor", key_hash="h1", name="ci",
                           created_at=1)
        await store.create_api_key(key)
        assert await store.get_api_key("h1") == key
        assert await store.get_api_key("nope") is None
        assert [k.id for k in await store.list_api_keys("t1")] == ["k1"]
        assert await store.list_api_keys("t2") == []


def new_workflow(name: str = "wf", content: str = "a", *, tenant: str = "t1",
                 at: float = 100.0) -> WorkflowRecord:
    return WorkflowRecord(tenant=tenant, name=name, content_hash=f"hash-{content}",
                          author="ann", created_at=at, format="yaml",
                          source=f"version: 1\nname: {name}\n# {content}\n")


class WorkflowConformance:
    """Registered workflows: immutable versions per tenant and name (DESIGN §11)."""

    async def test_versions_are_numbered_and_the_same_content_is_not_stored_twice(self, store):
        first, created = await store.put_workflow(new_workflow(content="a"))
        assert created and first.version == 1
        again, created_again = await store.put_workflow(new_workflow(content="a", at=200))
        assert not created_again and again == first  # the existing version, unchanged
        second, created = await store.put_workflow(new_workflow(content="b", at=300))
        assert created and second.version == 2 and second.created_at == 300
        back, created = await store.put_workflow(new_workflow(content="a", at=400))
        assert created and back.version == 3  # only the latest is compared: a revert is new

    async def test_get_latest_or_a_version_and_every_field_round_trips(self, store):
        await store.put_workflow(new_workflow(content="a"))
        await store.put_workflow(new_workflow(content="b"))
        latest = await store.get_workflow("t1", "wf")
        assert (latest.version, latest.content_hash) == (2, "hash-b")
        v1 = await store.get_workflow("t1", "wf", 1)
        assert v1 == new_workflow(content="a").model_copy(update={"version": 1})
        with pytest.raises(NotFound, match="version 3 of workflow 'wf' not found"):
            await store.get_workflow("t1", "wf", 3)
        with pytest.raises(NotFound, match="workflow 'nope' not found"):
            await store.get_workflow("t1", "nope")

    async def test_tenants_are_isolated_and_numbered_independently(self, store):
        await store.put_workflow(new_workflow(content="a"))
        await store.put_workflow(new_workflow(content="b"))
        theirs, created = await store.put_workflow(new_workflow(content="a", tenant="t2"))
        assert created and theirs.version == 1
        with pytest.raises(NotFound):
            await store.get_workflow("t3", "wf")
        assert await store.list_workflows("t3") == []
        assert await store.list_workflow_versions("t3", "wf") == []
        assert [w.version for w in await store.list_workflow_versions("t2", "wf")] == [1]

    async def test_list_gives_the_latest_of_each_name_and_versions_newest_first(self, store):
        for name, content in (("zeta", "1"), ("alpha", "1"), ("alpha", "2"), ("mid", "1")):
            await store.put_workflow(new_workflow(name, content))
        listed = await store.list_workflows("t1")
        assert [(w.name, w.version) for w in listed] == [("alpha", 2), ("mid", 1), ("zeta", 1)]
        versions = await store.list_workflow_versions("t1", "alpha")
        assert [(w.version, w.content_hash) for w in versions] == [(2, "hash-2"), (1, "hash-1")]

    async def test_concurrent_pushes_of_one_name_never_share_a_version(self, store):
        results = await asyncio.gather(*(store.put_workflow(new_workflow(content=str(i)))
                                         for i in range(8)))
        assert sorted(r.version for r, _created in results) == list(range(1, 9))
        assert all(created for _r, created in results)


def new_thread(tid: str = "th1", *, tenant: str = "t1", at: float = 100.0,
               ledger_id: str | None = None) -> ThreadRecord:
    return ThreadRecord(id=tid, tenant=tenant, agent="a", workflow="w", title="Hello",
                        metadata={"topic": "names", "n": 1}, created_at=at, updated_at=at,
                        ledger_id=ledger_id)


def new_turn(rid: str, thread_id: str = "th1", *, tenant: str = "t1", key: str | None = None,
             at: float = 100.0, ledgers: list[str] | None = None) -> RunRecord:
    return new_run(rid, tenant=tenant, key=key, at=at).model_copy(
        update={"thread_id": thread_id, "input": f"message of {rid}",
                "ledgers": ledgers or [rid]})


async def finish(store, rid: str, state: RunState = RunState.SUCCEEDED,  # type: ignore[no-untyped-def]
                 at: float = 101.0) -> RunRecord:
    run = await store.claim_run(rid, "w", 10, at)
    return await store.transition(rid, state, at, epoch=run.epoch, output=f"answer of {rid}",
                                  error_code=None if state == RunState.SUCCEEDED else "x")


class ThreadConformance:
    """Threads (DESIGN §10): turns one after the other, forks, deletion with anchors."""

    async def test_thread_round_trip_tenants_and_listing(self, store):
        created = await store.create_thread(new_thread(), [AuditEvent(kind="thread.created")])
        assert await store.get_thread("th1") == created
        assert (await store.get_thread("th1", "t1")).metadata == {"topic": "names", "n": 1}
        with pytest.raises(NotFound, match="thread th1 not found"):
            await store.get_thread("th1", "t2")
        with pytest.raises(NotFound):
            await store.get_thread("nope")
        await store.create_thread(new_thread("th2", at=200))
        await store.create_thread(new_thread("th3", tenant="t2", at=300))
        assert [t.id for t in await store.list_threads(tenant="t1")] == ["th2", "th1"]
        assert [t.id for t in await store.list_threads(tenant="t1", limit=1)] == ["th2"]
        assert [t.id for t in await store.list_threads()] == ["th3", "th2", "th1"]
        records = await store.list_thread_audit("th1")
        assert [r.kind for r in records] == ["thread.created"] and records[0].run_id == "th1"

    async def test_turns_are_numbered_and_strictly_one_after_the_other(self, store):
        await store.create_thread(new_thread())
        first, created = await store.create_turn(new_turn("r1", at=110))
        assert created and (first.thread_id, first.turn) == ("th1", 1)
        assert (await store.get_thread("th1")).updated_at == 110
        for state in (RunState.QUEUED, RunState.RUNNING, RunState.WAITING):
            if state == RunState.RUNNING:
                await store.claim_run("r1", "w", 10, 111)
            if state == RunState.WAITING:
                await store.transition("r1", RunState.WAITING, 112, epoch=1)
            with pytest.raises(TurnInProgress) as refused:
                await store.create_turn(new_turn("r2"))
            assert (refused.value.run_id, refused.value.turn) == ("r1", 1)
        with pytest.raises(NotFound):
            await store.get_run("r2")  # nothing was stored for the refused message
        await store.transition("r1", RunState.QUEUED, 113, epoch=1)
        await finish(store, "r1", at=114)
        second, _ = await store.create_turn(new_turn("r2", at=120))
        await finish(store, "r2", RunState.FAILED, at=121)
        third, _ = await store.create_turn(new_turn("r3", at=130))
        assert (second.turn, third.turn) == (2, 3)  # a failed turn is finished too
        assert [(r.id, r.turn) for r in await store.list_turns("th1")] == [
            ("r1", 1), ("r2", 2), ("r3", 3)]
        assert [r.data for r in await store.list_thread_audit("th1")] == [
            {"turn": 1, "run_id": "r1"}, {"turn": 2, "run_id": "r2"},
            {"turn": 3, "run_id": "r3"}]

    async def test_an_idempotent_message_returns_its_turn_even_while_it_runs(self, store):
        await store.create_thread(new_thread())
        await store.create_turn(new_turn("r1", key="k"))
        again, created = await store.create_turn(new_turn("r2", key="k"))
        assert not created and again.id == "r1" and again.turn == 1

    async def test_a_turn_needs_the_thread_of_its_tenant(self, store):
        await store.create_thread(new_thread())
        with pytest.raises(NotFound):
            await store.create_turn(new_turn("r1", "nope"))
        with pytest.raises(NotFound):
            await store.create_turn(new_turn("r1", tenant="t2"))
        assert await store.list_turns("th1") == []

    async def test_concurrent_messages_never_make_two_turns_of_one_number(self, store):
        await store.create_thread(new_thread())

        async def post(n: int):  # type: ignore[no-untyped-def]
            try:
                return (await store.create_turn(new_turn(f"r{n}")))[0]
            except TurnInProgress as exc:
                return exc

        results = await asyncio.gather(*(post(n) for n in range(8)))
        made = [r for r in results if isinstance(r, RunRecord)]
        assert len(made) == 1 and made[0].turn == 1
        assert all(r.run_id == made[0].id for r in results if isinstance(r, TurnInProgress))
        assert [r.id for r in await store.list_turns("th1")] == [made[0].id]

    async def test_every_turn_also_reserves_on_the_thread_ledger(self, store):
        await store.create_thread(new_thread(ledger_id="th1"),
                                  ledger=LedgerRecord(id="th1", limits={"steps": 3}))
        for n, at in ((1, 110), (2, 120)):
            rid = f"r{n}"
            await store.create_turn(new_turn(rid, at=at, ledgers=[rid, "th1"]),
                                    ledger=LedgerRecord(id=rid, limits={"steps": 10}))
            run = await store.claim_run(rid, "w", 10, at)
            await store.save_step(StepRecord(run_id=rid, seq=1, kind="model", name="m"),
                                  run.epoch, reserve={"steps": 1.0})
            await store.transition(rid, RunState.SUCCEEDED, at + 1, epoch=run.epoch)
        assert (await store.get_ledger("th1")).used == {"steps": 2.0}
        assert (await store.get_ledger("r2")).used == {"steps": 1.0}
        await store.create_turn(new_turn("r3", at=130, ledgers=["r3", "th1"]))
        run = await store.claim_run("r3", "w", 10, 130)
        await store.save_step(StepRecord(run_id="r3", seq=1, kind="model", name="m"),
                              run.epoch, reserve={"steps": 1.0})
        with pytest.raises(BudgetExceeded):
            await store.save_step(StepRecord(run_id="r3", seq=2, kind="model", name="m"),
                                  run.epoch, reserve={"steps": 1.0})
        assert (await store.get_ledger("th1")).exhausted == "steps"

    async def _two_turns(self, store):  # type: ignore[no-untyped-def]
        await store.create_thread(new_thread(), [AuditEvent(kind="thread.created")])
        for n, at in ((1, 110), (2, 120)):
            rid = f"r{n}"
            await store.create_turn(new_turn(rid, at=at), [AuditEvent(kind="run.created")])
            run = await store.claim_run(rid, "w", 10, at)
            await store.save_step(StepRecord(run_id=rid, seq=1, kind="model", name="m",
                                             status="completed", output={"content": "ok"}),
                                  run.epoch, [AuditEvent(kind="model.output")])
            if n == 2:  # a delegated child, and an approval with arguments
                await store.create_run(new_run("r2.2", parent="r2", at=at).model_copy(
                    update={"root_id": "r2", "input": "the task"}))
                await store.create_approval(ApprovalRecord(
                    id="a1", tenant="t1", run_id=rid, root_id=rid, step=3, action="x",
                    arguments={"secret_plan": "world"}, created_at=at), run.epoch)
            await store.transition(rid, RunState.SUCCEEDED, at + 1, epoch=run.epoch,
                                   output=f"answer {n}")

    async def test_a_fork_copies_turns_with_their_journal_and_own_chains(self, store):
        await self._two_turns(store)
        source = await store.get_run("r1")
        copy = source.model_copy(update={"id": "f1", "root_id": "f1", "thread_id": "th9",
                                         "turn": 1, "ledgers": []})
        steps = [s.model_copy(update={"run_id": "f1"}) for s in await store.list_steps("r1")]
        fork = new_thread("th9", at=300).model_copy(update={"forked_from": "th1",
                                                            "forked_turn": 1})
        made = await store.fork_thread(fork, [TurnCopy(run=copy, steps=steps, audit=[
            AuditEvent(kind="run.forked", data={"source_run_id": "r1"}),
            AuditEvent(kind="state.changed", data={"to": "succeeded"})])],
            [AuditEvent(kind="thread.forked")])
        assert made == await store.get_thread("th9")
        [turn] = await store.list_turns("th9")
        assert (turn.id, turn.turn, turn.state, turn.output) == ("f1", 1, "succeeded", "answer 1")
        assert turn.input == "message of r1"
        assert [s.output for s in await store.list_steps("f1")] == [{"content": "ok"}]
        records = await store.list_audit("f1")
        assert [r.kind for r in records] == ["run.forked", "state.changed"]
        assert verify_chain(records, key=store.audit_key, head=turn.audit_head,
                            terminal_state="succeeded").ok
        # the source thread deleted: the fork keeps its copy
        await store.delete_thread("th1", 400)
        assert (await store.get_run("f1")).output == "answer 1"
        assert len(await store.list_steps("f1")) == 1
        with pytest.raises(NotFound):  # a fork of a deleted thread is refused
            await store.fork_thread(new_thread("th8").model_copy(
                update={"forked_from": "th1"}), [])
        with pytest.raises(NotFound):
            await store.get_thread("th8")

    async def test_delete_erases_content_and_anchors_each_chain_head(self, store):
        await self._two_turns(store)
        heads = {rid: (await store.get_run(rid)).audit_head for rid in ("r1", "r2", "r2.2")}
        gone = await store.delete_thread("th1", 500, tenant="t1", actor="user:ann")
        assert gone.deleted_at == 500 and gone.title == "" and gone.metadata == {}
        with pytest.raises(NotFound):
            await store.get_thread("th1")
        assert (await store.get_thread("th1", deleted=True)).deleted_at == 500
        assert await store.list_threads() == []
        for rid in ("r1", "r2", "r2.2"):
            run = await store.get_run(rid)
            assert (run.input, run.output, run.error_message) == ("", None, None)
            assert run.audit_head == heads[rid]  # the row keeps its head
            assert await store.list_steps(rid) == [] and await store.list_audit(rid) == []
        assert (await store.get_approval("a1")).arguments == {}
        chain = await store.list_thread_audit("th1")
        assert verify_chain(chain, key=store.audit_key, run_id="th1").ok
        deleted = chain[-1]
        assert (deleted.kind, deleted.actor) == ("thread.deleted", "user:ann")
        assert deleted.data["runs"] == [
            {"run_id": "r1", "turn": 1, "audit_seq": heads["r1"][0],
             "audit_hash": heads["r1"][1]},
            {"run_id": "r2", "turn": 2, "audit_seq": heads["r2"][0],
             "audit_hash": heads["r2"][1]},
            {"run_id": "r2.2", "turn": None, "audit_seq": heads["r2.2"][0],
             "audit_hash": heads["r2.2"][1]}]
        with pytest.raises(NotFound):
            await store.delete_thread("th1", 501)
        with pytest.raises(NotFound):
            await store.create_turn(new_turn("r3"))

    async def test_delete_refuses_a_thread_with_a_turn_in_progress_or_of_another_tenant(
            self, store):
        await store.create_thread(new_thread())
        await store.create_turn(new_turn("r1"))
        with pytest.raises(NotFound):
            await store.delete_thread("th1", 200, tenant="t2")
        with pytest.raises(TurnInProgress):
            await store.delete_thread("th1", 200)
        assert (await store.get_run("r1")).input == "message of r1"
        await finish(store, "r1")
        await store.delete_thread("th1", 200)

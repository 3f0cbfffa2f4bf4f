"""The shared store conformance suite. Each backend subclasses ``StoreConformance`` and
provides a ``store`` fixture yielding an open, empty store."""

from __future__ import annotations

import asyncio

import pytest

from alpaca_engine.budget import BudgetExceeded
from alpaca_engine.errors import ApprovalConflict, LeaseLost, NotFound
from alpaca_engine.lifecycle import IllegalTransition, RunState
from alpaca_engine.store.records import (
    ApiKeyRecord,
    ApprovalRecord,
    AuditEvent,
    LedgerRecord,
    RunRecord,
    StepRecord,
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

"""One round trip per journal write on the real PostgreSQL, and exactly as strong as before.

The lease owner's write assumes what it last wrote (the chain head, the ledger values); the
server checks that under the row locks. Another actor's write in between (a cancel, an
approval decided elsewhere, a sibling's reservation on the shared ledger, a crash take-over)
must send the write down the locked path: nothing lost, nothing counted twice, one chain.
A store whose backend connections the server killed carries on with fresh ones.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from alpaca_engine.budget import BudgetExceeded
from alpaca_engine.errors import LeaseLost
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store import observers
from alpaca_engine.store.base import RunFlags, StepWrite
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.store.records import (
    ApprovalRecord,
    AuditEvent,
    LedgerRecord,
    StepRecord,
    StepStatus,
)
from alpaca_engine.telemetry.audit import verify_chain
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool
from tests.conformance.store_suite import new_run
from tests.faultkit import TcpProxy
from tests.helpers import engine, workflow
from tests.integration.test_store_postgres import KEY, PG_URL, _admin, _open, schema

pytestmark = pytest.mark.postgres
__all__ = ["schema"]  # the fixture, imported for the tests below


async def _leased(s: PostgresStore, rid: str, limits: dict[str, float],
                  ledgers: Sequence[str] | None = None) -> int:
    """Create run ``rid`` (with its own ledger when ``ledgers`` is None) and lease it."""
    own = ledgers is None
    await s.create_run(new_run(rid).model_copy(update={"ledgers": [rid] if own else ledgers}),
                       [AuditEvent(kind="run.created")],
                       ledger=LedgerRecord(id=rid, limits=limits) if own else None)
    run = await s.claim_run(rid, "w", 60, 100)
    assert run is not None
    return run.epoch


def _step(rid: str, seq: int, **kw: object) -> StepRecord:
    fields: dict[str, object] = {"kind": "tool", "name": "t", **kw}
    return StepRecord.model_validate({"run_id": rid, "seq": seq, "started_at": 101, **fields})


async def _chain_ok(s: PostgresStore, rid: str) -> list[str]:
    """The run's chain verifies up to the head its row carries; returns the record kinds."""
    records = await s.list_audit(rid)
    run = await s.get_run(rid)
    result = verify_chain(records, key=KEY, head=run.audit_head)
    assert result.ok, result.reason
    assert run.audit_seq == len(records)
    return [r.kind for r in records]


@pytest.fixture
async def proxied(schema: str) -> AsyncIterator[tuple[PostgresStore, TcpProxy]]:
    """A store whose every byte to the server goes through a proxy that counts round trips."""
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    s = PostgresStore(proxy.url_for(PG_URL), audit_key=KEY, schema=schema)
    await s.open()
    yield s, proxy
    await s.close()
    await proxy.stop()


async def test_a_journal_write_of_the_lease_owner_is_one_round_trip(proxied):
    s, proxy = proxied
    epoch = await _leased(s, "r1", {"steps": 10, "tokens": 1000})
    step = _step("r1", 1, kind="model", name="m")
    before = proxy.round_trips
    flags = await s.save_step(step, epoch, [AuditEvent(kind="budget.reserved")],
                              reserve={"steps": 1, "tokens": 100})
    assert proxy.round_trips - before == 1
    assert flags == RunFlags(epoch=epoch, cancel_requested=False)
    step.status, step.output, step.finished_at = StepStatus.COMPLETED, {"content": "hi"}, 102
    before = proxy.round_trips
    await s.save_step(step, epoch, [AuditEvent(kind="model.output", data={"content": "hi"})],
                      settle={"tokens": -40})
    assert proxy.round_trips - before == 1
    assert (await s.get_ledger("r1")).used == {"steps": 1, "tokens": 60}
    [saved] = await s.list_steps("r1")
    assert saved.status == StepStatus.COMPLETED and saved.reserved == {"steps": 1, "tokens": 100}
    assert await _chain_ok(s, "r1") == ["run.created", "state.changed", "budget.reserved",
                                        "model.output"]


async def test_a_cancel_requested_elsewhere_is_seen_by_the_next_write_and_the_chain_links(
        schema: str):
    owner, api = await _open(schema), await _open(schema)
    try:
        epoch = await _leased(owner, "r1", {"steps": 10})
        await owner.save_step(_step("r1", 1), epoch, [AuditEvent(kind="tool.chosen")],
                              reserve={"steps": 1})
        await api.request_cancel("r1")  # another process moves the chain head
        flags = await owner.save_step(_step("r1", 2), epoch, [AuditEvent(kind="tool.chosen")],
                                      reserve={"steps": 1})
        assert flags == RunFlags(epoch=epoch, cancel_requested=True)
        assert await _chain_ok(owner, "r1") == ["run.created", "state.changed", "tool.chosen",
                                                "cancel.requested", "tool.chosen"]
        assert [st.seq for st in await owner.list_steps("r1")] == [1, 2]
        assert (await owner.get_ledger("r1")).used == {"steps": 2}
    finally:
        await owner.close()
        await api.close()


async def test_an_approval_decided_elsewhere_while_the_run_runs_keeps_one_chain(schema: str):
    owner, api = await _open(schema), await _open(schema)
    try:
        epoch = await _leased(owner, "r1", {"steps": 10})
        await owner.create_approval(ApprovalRecord(
            id="ap1", tenant="t1", run_id="r1", root_id="r1", step=1, action="notify",
            created_at=101), epoch, [AuditEvent(kind="approval.requested")])
        await api.decide_approval("ap1", approve=True, by="sue", comment=None, now=102)
        await owner.save_step(_step("r1", 1), epoch, [AuditEvent(kind="tool.chosen")],
                              reserve={"steps": 1})
        kinds = await _chain_ok(owner, "r1")
        assert kinds[-3:] == ["approval.requested", "approval.decided", "tool.chosen"]
        assert (await owner.get_run("r1")).state == RunState.RUNNING
    finally:
        await owner.close()
        await api.close()


async def test_siblings_reserving_on_a_shared_ledger_from_two_processes_never_overspend(
        schema: str):
    a, b = await _open(schema), await _open(schema)
    try:
        await a.create_run(new_run("root").model_copy(update={"ledgers": ["root"]}),
                           ledger=LedgerRecord(id="root", limits={"tool_calls": 5,
                                                                  "tokens": 100}))
        epochs = {"c1": await _leased(a, "c1", {}, ["root"]),
                  "c2": await _leased(b, "c2", {}, ["root"])}
        fitted: list[str] = []
        for seq in range(1, 5):  # alternate: each write finds the other's debit
            for rid, s in (("c1", a), ("c2", b)):
                step = _step(rid, seq)
                try:
                    await s.save_step(step, epochs[rid], [AuditEvent(kind="budget.reserved")],
                                      reserve={"tool_calls": 1, "tokens": 10})
                except BudgetExceeded:
                    continue
                fitted.append(f"{rid}.{seq}")
                step.status = StepStatus.COMPLETED
                await s.save_step(step, epochs[rid], settle={"tokens": -5})
        assert fitted == ["c1.1", "c2.1", "c1.2", "c2.2", "c1.3"]
        ledger = await a.get_ledger("root")
        assert ledger.used == {"tool_calls": 5, "tokens": 25}
        assert ledger.exhausted == "tool_calls"
        for rid in epochs:
            kinds = await _chain_ok(a, rid)
            assert kinds.count("budget.reserved") == len(await a.list_steps(rid))
    finally:
        await a.close()
        await b.close()


async def test_a_step_reserved_before_a_crash_is_not_debited_again_by_the_next_owner(
        schema: str):
    crashed, resumed = await _open(schema), await _open(schema)
    try:
        epoch = await _leased(crashed, "r1", {"steps": 10})
        await crashed.save_step(_step("r1", 1), epoch, [AuditEvent(kind="budget.reserved")],
                                reserve={"steps": 1})
        taken = await resumed.claim_run("r1", "w2", 60, 101, steal=True, expected_epoch=epoch)
        assert taken is not None and taken.epoch == epoch + 1
        again = _step("r1", 1)
        await resumed.save_step(again, taken.epoch, [AuditEvent(kind="step.resumed")],
                                reserve={"steps": 1})
        assert again.reserved == {"steps": 1}
        assert (await resumed.get_ledger("r1")).used == {"steps": 1}
        with pytest.raises(LeaseLost):  # the crashed owner's next write is refused
            await crashed.save_step(_step("r1", 2), epoch, [AuditEvent(kind="x")],
                                    reserve={"steps": 1})
        kinds = await _chain_ok(resumed, "r1")
        assert "x" not in kinds and kinds[-1] == "step.resumed"
        assert (await resumed.get_ledger("r1")).used == {"steps": 1}
    finally:
        await crashed.close()
        await resumed.close()


async def test_a_write_refused_for_a_lost_lease_is_heard_by_no_observer(schema: str):
    owner, other = await _open(schema), await _open(schema)
    heard: list[str] = []
    unsubscribe = observers.subscribe(lambda rid, events: heard.extend(e.kind for e in events))
    try:
        epoch = await _leased(owner, "r1", {"steps": 10})
        assert await other.claim_run("r1", "w2", 60, 101, steal=True) is not None
        heard.clear()
        with pytest.raises(LeaseLost):
            await owner.save_step(_step("r1", 1), epoch, [AuditEvent(kind="late")],
                                  reserve={"steps": 1})
        assert heard == []
        assert (await owner.get_ledger("r1")).used == {}
    finally:
        unsubscribe()
        await owner.close()
        await other.close()


async def test_observers_hear_the_fast_and_the_fallback_write_once_each(schema: str):
    owner, api = await _open(schema), await _open(schema)
    heard: list[str] = []
    unsubscribe = observers.subscribe(lambda rid, events: heard.extend(e.kind for e in events))
    try:
        epoch = await _leased(owner, "r1", {"steps": 10})
        heard.clear()
        await owner.save_step(_step("r1", 1), epoch, [AuditEvent(kind="one")],
                              reserve={"steps": 1})
        await api.request_cancel("r1")
        await owner.save_step(_step("r1", 2), epoch, [AuditEvent(kind="two")],
                              reserve={"steps": 1})
        assert heard == ["one", "cancel.requested", "two"]
    finally:
        unsubscribe()
        await owner.close()
        await api.close()


async def test_the_store_replaces_connections_whose_backends_the_server_killed(schema: str):
    app = f"alpaca-test-{uuid.uuid4().hex[:8]}"
    s = PostgresStore(f"{PG_URL}?application_name={app}", audit_key=KEY, schema=schema,
                      pool_size=4)
    await s.open()
    admin = await _admin()
    try:
        epoch = await _leased(s, "r1", {"steps": 10})
        await s.save_step(_step("r1", 1), epoch, [AuditEvent(kind="one")], reserve={"steps": 1})
        cur = await admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) "
            "FROM pg_stat_activity WHERE application_name = %s", (app,))
        row = await cur.fetchone()
        assert row is not None and row[0] >= 1  # every connection of the pool is gone
        await s.save_step(_step("r1", 2), epoch, [AuditEvent(kind="two")], reserve={"steps": 1})
        assert [st.seq for st in await s.list_steps("r1")] == [1, 2]
        assert (await _chain_ok(s, "r1"))[-2:] == ["one", "two"]
        cur = await admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))
        row = await cur.fetchone()
        assert row is not None and row[0] >= 1  # served by fresh connections
    finally:
        await admin.close()
        await s.close()


async def test_a_cancel_from_another_process_stops_the_run_at_its_next_turn(schema: str):
    """The interrupt check reads the flags the last journal write saw under the lock: a
    cancel requested during a tool call is seen before the next model turn."""
    runner_store, api = await _open(schema), await _open(schema)

    @tool
    async def stop_me(ctx: ToolContext) -> str:
        await api.request_cancel(ctx.run_id)
        return "ok"

    wf = workflow([{"tool": "stop_me"}, "never reached"], [stop_me])
    try:
        run = await engine(runner_store, wf).run(wf, "agent", "go")
        assert run.state == RunState.CANCELLED and run.error_code == "cancelled"
        steps = await runner_store.list_steps(run.id)
        assert [(s.seq, s.kind, s.status) for s in steps] == [
            (1, "model", "completed"), (2, "tool", "completed")]  # no model turn after it
        kinds = await _chain_ok(runner_store, run.id)
        assert kinds.count("cancel.requested") == 1 and kinds[-1] == "state.changed"
    finally:
        await runner_store.close()
        await api.close()


async def test_a_runs_end_writes_its_last_outcome_in_the_same_two_round_trips(proxied):
    s, proxy = proxied
    heard: list[str] = []
    unsubscribe = observers.subscribe(lambda rid, events: heard.extend(e.kind for e in events))
    try:
        epoch = await _leased(s, "r1", {"steps": 10, "tokens": 1000})
        step = _step("r1", 1, kind="model", name="m")
        await s.save_step(step, epoch, [AuditEvent(kind="budget.reserved")],
                          reserve={"steps": 1, "tokens": 100})
        step.status, step.output, step.finished_at = StepStatus.COMPLETED, {"content": "hi"}, 102
        heard.clear()
        before = proxy.round_trips
        done = await s.transition("r1", RunState.SUCCEEDED, 103, epoch=epoch, output="hi",
                                  steps=[StepWrite(step, [AuditEvent(kind="model.output")],
                                                   settle={"tokens": -40})])
        assert proxy.round_trips - before == 2
        assert heard == ["model.output", "state.changed"]  # after the commit, once each
    finally:
        unsubscribe()
    assert done == await s.get_run("r1") and done.state == RunState.SUCCEEDED
    assert (await s.get_ledger("r1")).used == {"steps": 1, "tokens": 60}
    assert [st.status for st in await s.list_steps("r1")] == [StepStatus.COMPLETED]
    assert (await _chain_ok(s, "r1"))[-2:] == ["model.output", "state.changed"]


async def test_a_runs_end_after_a_siblings_debit_on_the_shared_ledger_stays_exact(
        schema: str):
    a, b = await _open(schema), await _open(schema)
    heard: list[str] = []
    unsubscribe = observers.subscribe(lambda rid, events: heard.extend(e.kind for e in events))
    try:
        await a.create_run(new_run("root").model_copy(update={"ledgers": ["root"]}),
                           ledger=LedgerRecord(id="root", limits={"tokens": 100}))
        e1, e2 = await _leased(a, "c1", {}, ["root"]), await _leased(b, "c2", {}, ["root"])
        step = _step("c1", 1, kind="model", name="m")
        await a.save_step(step, e1, [AuditEvent(kind="budget.reserved")], reserve={"tokens": 30})
        await b.save_step(_step("c2", 1), e2, [AuditEvent(kind="budget.reserved")],
                          reserve={"tokens": 20})  # the ledger c1's store last saw moved
        step.status, step.finished_at = StepStatus.COMPLETED, 102
        heard.clear()
        done = await a.transition("c1", RunState.SUCCEEDED, 103, epoch=e1, output="x",
                                  steps=[StepWrite(step, [AuditEvent(kind="model.output")],
                                                   settle={"tokens": -10})])
        assert heard == ["model.output", "state.changed"]
    finally:
        unsubscribe()
        await b.close()
    try:
        assert done.state == RunState.SUCCEEDED and done == await a.get_run("c1")
        assert (await a.get_ledger("root")).used == {"tokens": 40}  # 30 - 10 + 20
        assert (await _chain_ok(a, "c1"))[-2:] == ["model.output", "state.changed"]
    finally:
        await a.close()

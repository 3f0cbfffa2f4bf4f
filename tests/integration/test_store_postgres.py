"""PostgreSQL passes the shared store conformance suite, and stays correct under concurrency.

Each test gets a fresh random schema (dropped afterwards), so tests never see each other's rows
and can run in parallel against one server.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from alpaca_engine.budget import BudgetExceeded
from alpaca_engine.errors import ApprovalConflict, LeaseLost, TurnInProgress
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.factory import make_store
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.store.postgres_migrations import POSTGRES
from alpaca_engine.store.records import (
    ApprovalRecord,
    ApprovalStatus,
    AuditEvent,
    LedgerRecord,
    StepRecord,
    StepStatus,
)
from alpaca_engine.telemetry.audit import verify_chain
from tests.conformance.store_suite import (
    LedgerApprovalKeyConformance,
    StoreConformance,
    ThreadConformance,
    WorkflowConformance,
    new_run,
    new_thread,
    new_turn,
    new_workflow,
)
from tests.conftest import service_unavailable

pytestmark = pytest.mark.postgres

PG_URL = os.environ.get("ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEY = b"k"


async def _admin() -> psycopg.AsyncConnection[tuple[object, ...]]:
    """An autocommit connection for setup and inspection; skips/fails when the server is down."""
    try:
        return await psycopg.AsyncConnection.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).strip())
        raise  # unreachable: service_unavailable skips or fails


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"alpaca_test_{uuid.uuid4().hex[:12]}"
    admin = await _admin()
    try:
        yield name
    finally:
        await admin.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
        )
        await admin.close()


async def _open(schema: str, pool_size: int = 10) -> PostgresStore:
    s = PostgresStore(PG_URL, audit_key=KEY, schema=schema, pool_size=pool_size)
    await s.open()
    return s


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStore]:
    s = await _open(schema)
    yield s
    await s.close()


class TestPostgres(StoreConformance, LedgerApprovalKeyConformance, WorkflowConformance,
                   ThreadConformance):
    pass  # uses the fresh-schema ``store`` fixture above


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_claim_next_claims_each_run_exactly_once(schema: str):
    setup = await _open(schema)
    ids = [f"r{i:02d}" for i in range(10)]
    for i, rid in enumerate(ids):
        await setup.create_run(new_run(rid, at=float(i)))
    workers = [await _open(schema, pool_size=1) for _ in range(20)]  # 20 connections
    barrier = asyncio.Barrier(len(workers))

    async def work(n: int, s: PostgresStore):
        await barrier.wait()
        return await s.claim_next(f"w{n}", 30, 1000)

    try:
        claims = await asyncio.gather(*(work(n, s) for n, s in enumerate(workers)))
    finally:
        for s in workers:
            await s.close()
    won = [c for c in claims if c is not None]
    assert sorted(c.id for c in won) == ids  # every run once, none twice
    assert len(won) == 10 and claims.count(None) == 10
    for run in await setup.list_runs():
        assert run.state == RunState.RUNNING and run.epoch == 1
        records = await setup.list_audit(run.id)
        assert [r.kind for r in records] == ["state.changed"]
        assert verify_chain(records, key=KEY).ok
    await setup.close()


async def test_concurrent_audit_and_steps_from_two_stores_keep_one_chain(schema: str):
    a, b = await _open(schema), await _open(schema)
    await a.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
    run = await a.claim_run("r1", "w", 60, 100)
    assert run is not None
    n = 25

    async def appender(s: PostgresStore, tag: str):
        for i in range(n):
            await s.append_audit(
                "r1",
                [
                    AuditEvent(kind=f"{tag}.a", data={"i": i}),
                    AuditEvent(kind=f"{tag}.b", data={"i": i}),
                ],
                101,
                epoch=run.epoch,
            )

    async def stepper(s: PostgresStore, base: int):
        for i in range(n):
            step = StepRecord(
                run_id="r1", seq=base + i, kind="tool", name="t", input={"i": i}, started_at=101
            )
            await s.save_step(step, run.epoch, [AuditEvent(kind="tool.chosen", data={"i": i})])

    try:
        await asyncio.gather(appender(a, "a"), appender(b, "b"), stepper(a, 1), stepper(b, 1001))
        records = await a.list_audit("r1")
        expected = 2 + 2 * 2 * n + 2 * n  # created + claimed, two appenders, two steppers
        assert [r.seq for r in records] == list(range(1, expected + 1))
        result = verify_chain(records, key=KEY)
        assert result.ok, result.reason
        assert len(await b.list_steps("r1")) == 2 * n
    finally:
        await a.close()
        await b.close()


async def test_stale_epoch_is_refused_across_store_instances(schema: str):
    a, b = await _open(schema), await _open(schema)
    try:
        await a.create_run(new_run("r1"))
        old = await a.claim_run("r1", "w1", 10, 100)
        new = await b.claim_run("r1", "w2", 10, 100, steal=True)
        assert old and new and new.epoch == old.epoch + 1
        step = StepRecord(run_id="r1", seq=1, kind="tool", name="t")
        with pytest.raises(LeaseLost):
            await a.save_step(step, old.epoch)
        with pytest.raises(LeaseLost):
            await a.append_audit("r1", [AuditEvent(kind="x")], 101, epoch=old.epoch)
        with pytest.raises(LeaseLost):
            await a.renew_lease("r1", "w1", old.epoch, 10, 101)
        with pytest.raises(LeaseLost):
            await a.transition("r1", RunState.SUCCEEDED, 101, epoch=old.epoch)
        await b.save_step(step, new.epoch)
        done = await b.transition("r1", RunState.SUCCEEDED, 102, epoch=new.epoch)
        assert done.state == RunState.SUCCEEDED
        assert "x" not in [r.kind for r in await a.list_audit("r1")]
        assert verify_chain(await a.list_audit("r1"), key=KEY).ok
    finally:
        await a.close()
        await b.close()


async def test_fence_waits_for_a_concurrent_steal_and_then_refuses(schema: str):
    """The epoch is checked after the row lock is granted, not from an earlier snapshot."""
    s = await _open(schema)
    admin = await _admin()
    try:
        await s.create_run(new_run("r1"))
        run = await s.claim_run("r1", "w1", 10, 100)
        assert run is not None
        await admin.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM runs WHERE id='r1' FOR UPDATE")
            write = asyncio.create_task(
                s.save_step(StepRecord(run_id="r1", seq=1, kind="tool", name="t"), run.epoch)
            )
            await asyncio.sleep(0.3)
            assert not write.done()  # blocked on the row lock
            await admin.execute("UPDATE runs SET epoch=epoch+1 WHERE id='r1'")
        with pytest.raises(LeaseLost):
            await write
        assert await s.list_steps("r1") == []
    finally:
        await admin.close()
        await s.close()


async def _leased_on(s: PostgresStore, rid: str, ledgers: list[str]) -> int:
    """Create run ``rid`` reserving on ``ledgers`` (which must exist) and lease it."""
    await s.create_run(new_run(rid).model_copy(update={"ledgers": ledgers}))
    run = await s.claim_run(rid, "w", 60, 100)
    assert run is not None
    return run.epoch


async def test_concurrent_reservations_on_a_shared_ledger_never_overspend(schema: str):
    """8 stores (own pools) x 10 concurrent reservations on distinct runs: exactly 25 fit."""
    setup = await _open(schema)
    await setup.create_run(
        new_run("root").model_copy(update={"ledgers": ["root"]}),
        ledger=LedgerRecord(id="root", limits={"tool_calls": 25}),
    )
    n_stores, per_store = 8, 10
    epochs = {}
    for w in range(n_stores):
        for i in range(per_store):
            rid = f"root.w{w}.{i}"
            epochs[rid] = await _leased_on(setup, rid, ["root"])
    stores = [await _open(schema, pool_size=per_store) for _ in range(n_stores)]
    barrier = asyncio.Barrier(n_stores * per_store)

    async def reserve(s: PostgresStore, rid: str, seq: int) -> bool:
        step = StepRecord(run_id=rid, seq=seq, kind="tool", name="t", started_at=101)
        await barrier.wait()
        try:
            await s.save_step(
                step, epochs[rid], [AuditEvent(kind="budget.reserved")], reserve={"tool_calls": 1}
            )
        except BudgetExceeded as exc:
            assert exc.ledger_id == "root" and exc.resource == "tool_calls"
            return False
        assert step.reserved == {"tool_calls": 1}
        return True

    try:
        results = await asyncio.gather(
            *(
                reserve(s, f"root.w{w}.{i}", i + 1)
                for w, s in enumerate(stores)
                for i in range(per_store)
            )
        )
    finally:
        for s in stores:
            await s.close()
    try:
        assert results.count(True) == 25
        assert results.count(False) == n_stores * per_store - 25
        ledger = await setup.get_ledger("root")
        assert ledger.used == {"tool_calls": 25} and ledger.exhausted == "tool_calls"
        written = []
        for rid in epochs:
            steps = await setup.list_steps(rid)
            written += steps
            kinds = [r.kind for r in await setup.list_audit(rid)]
            assert kinds.count("budget.reserved") == len(steps)  # refused: no audit either
        assert len(written) == 25
        assert all(s.reserved == {"tool_calls": 1} for s in written)
    finally:
        await setup.close()


async def test_reservations_lock_ledgers_in_one_order_so_they_never_deadlock(schema: str):
    """Runs listing the same two ledgers in opposite orders reserve concurrently: the ledger
    rows are locked by id, so there is no deadlock, and both ledgers are debited per step."""
    setup = await _open(schema)
    for lid in ("a", "b"):
        await setup.create_run(
            new_run(lid).model_copy(update={"ledgers": [lid]}),
            ledger=LedgerRecord(id=lid, limits={"steps": 1000}),
        )
    epochs = {}
    for i in range(20):
        rid = f"r{i:02d}"
        epochs[rid] = await _leased_on(setup, rid, ["a", "b"] if i % 2 else ["b", "a"])
    stores = [await _open(schema, pool_size=5) for _ in range(4)]
    n = 5

    async def work(s: PostgresStore, rid: str) -> None:
        for seq in range(1, n + 1):
            step = StepRecord(run_id=rid, seq=seq, kind="tool", name="t")
            await s.save_step(step, epochs[rid], reserve={"steps": 1, "tokens": 2})
            step.status = StepStatus.COMPLETED
            await s.save_step(step, epochs[rid], settle={"tokens": -1})

    try:
        await asyncio.gather(*(work(stores[i % len(stores)], rid) for i, rid in enumerate(epochs)))
        for lid in ("a", "b"):
            ledger = await setup.get_ledger(lid)
            assert ledger.used == {"steps": 20 * n, "tokens": 20 * n}
            assert ledger.exhausted is None
    finally:
        for s in stores:
            await s.close()
        await setup.close()


async def test_concurrent_decisions_on_one_approval_exactly_one_wins(schema: str):
    a, b = await _open(schema), await _open(schema)
    try:
        await a.create_run(new_run("r1"))
        run = await a.claim_run("r1", "w", 60, 100)
        assert run is not None
        await a.create_approval(
            ApprovalRecord(
                id="ap1",
                tenant="t1",
                run_id="r1",
                root_id="r1",
                step=1,
                action="notify",
                created_at=101,
            ),
            run.epoch,
            [AuditEvent(kind="approval.requested")],
        )
        await a.transition("r1", RunState.WAITING, 102, epoch=run.epoch)
        barrier = asyncio.Barrier(2)

        async def decide(s: PostgresStore, who: str, approve: bool) -> object:
            await barrier.wait()
            try:
                return await s.decide_approval(
                    "ap1", approve=approve, by=who, comment=who, now=103, tenant="t1"
                )
            except ApprovalConflict as exc:
                return exc

        outcomes = await asyncio.gather(decide(a, "sue", True), decide(b, "bob", False))
        won = [o for o in outcomes if isinstance(o, ApprovalRecord)]
        lost = [o for o in outcomes if isinstance(o, ApprovalConflict)]
        assert len(won) == 1 and len(lost) == 1
        stored = await b.get_approval("ap1")
        assert stored.status == won[0].status != ApprovalStatus.PENDING
        assert stored.decided_by == won[0].decided_by == stored.comment
        assert (await a.get_run("r1")).state == RunState.QUEUED
        records = await a.list_audit("r1")
        assert [r.kind for r in records].count("approval.decided") == 1
        assert verify_chain(records, key=KEY).ok
    finally:
        await a.close()
        await b.close()


async def test_concurrent_pushers_of_one_workflow_get_distinct_versions(schema: str):
    """Ten stores (ten connections) push different content under one name at once: the
    primary key refuses a duplicate number and the losers retry, so 1..10 are each taken
    once; a second round of the same contents changes nothing only for the latest one."""
    setup = await _open(schema)
    pushers = [await _open(schema, pool_size=1) for _ in range(10)]
    barrier = asyncio.Barrier(len(pushers))

    async def push(n: int, s: PostgresStore):
        await barrier.wait()
        return await s.put_workflow(new_workflow(content=f"c{n}", at=float(n)))

    try:
        results = await asyncio.gather(*(push(n, s) for n, s in enumerate(pushers)))
    finally:
        for s in pushers:
            await s.close()
    try:
        assert sorted(r.version for r, _ in results) == list(range(1, 11))
        assert all(created for _, created in results)
        stored = await setup.list_workflow_versions("t1", "wf")
        assert [w.version for w in stored] == list(range(10, 0, -1))
        by_version = {r.version: r.content_hash for r, _ in results}
        assert {w.version: w.content_hash for w in stored} == by_version
        latest = stored[0]
        again, created = await setup.put_workflow(
            new_workflow(content=latest.content_hash.removeprefix("hash-")))
        assert not created and again.version == 10
    finally:
        await setup.close()


# -- schema and migrations --------------------------------------------------------------------


async def test_migrations_are_versioned_and_idempotent(schema: str):
    stores = await asyncio.gather(*(_open(schema) for _ in range(5)))  # racing openers
    try:
        s = stores[0]
        assert await s.schema_version() == len(POSTGRES)
        assert await s.upgrade() == []  # nothing pending the second time
        admin = await _admin()
        try:
            cur = await admin.execute(
                sql.SQL("SELECT version FROM {}.schema_migrations ORDER BY version").format(
                    sql.Identifier(schema)
                )
            )
            assert [r[0] for r in await cur.fetchall()] == list(range(1, len(POSTGRES) + 1))
            cur = await admin.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema=%s "
                "ORDER BY table_name",
                (schema,),
            )
            tables = [r[0] for r in await cur.fetchall()]
            assert tables == [
                "api_keys",
                "approvals",
                "audit",
                "ledgers",
                "runs",
                "schema_migrations",
                "steps",
                "thread_audit",
                "threads",
                "workflows",
            ]
        finally:
            await admin.close()
    finally:
        for st in stores:
            await st.close()


async def test_existing_empty_schema_starts_at_version_zero(schema: str):
    admin = await _admin()
    await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    s = await _open(schema)  # a schema that already exists is used, not re-created
    try:
        assert await s.schema_version() == len(POSTGRES)
        await admin.execute(
            sql.SQL(
                "DROP TABLE {0}.thread_audit, {0}.threads, {0}.workflows, {0}.api_keys, "
                "{0}.approvals, {0}.ledgers, {0}.audit, {0}.steps, {0}.runs, "
                "{0}.schema_migrations"
            ).format(sql.Identifier(schema))
        )
        assert await s.schema_version() == 0
        assert await s.upgrade() == list(range(1, len(POSTGRES) + 1))
        assert await s.schema_version() == len(POSTGRES)
    finally:
        await admin.close()
        await s.close()
    with pytest.raises(RuntimeError, match="not open"):
        await s.get_run("r1")


async def test_factory_makes_a_postgres_store_using_the_url_search_path(schema: str):
    admin = await _admin()
    await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    await admin.close()
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    for scheme_url in (url, url.replace("postgresql://", "postgres://", 1)):
        s = make_store(scheme_url, audit_key=KEY)
        assert isinstance(s, PostgresStore) and s.schema is None
    s = make_store(url, audit_key=KEY)
    await s.open()
    try:
        assert await s.schema_version() == len(POSTGRES)  # type: ignore[attr-defined]
        await s.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        assert [r.kind for r in await s.list_audit("r1")] == ["run.created"]
    finally:
        await s.close()


async def test_audit_data_round_trips_exactly(store: PostgresStore):
    """Numbers JSONB would rewrite (1e20 -> an integer) must still verify."""
    data = {"big": 1e20, "small": 1e-7, "f": 1.0, "s": "é\u2028", "nested": {"b": [1, 2.5]}}
    await store.create_run(new_run("r1"), [AuditEvent(kind="odd", data=data)])
    records = await store.list_audit("r1")
    assert records[0].data == data and isinstance(records[0].data["big"], float)
    assert verify_chain(records, key=KEY).ok


async def test_concurrent_messages_from_many_processes_make_one_turn(schema: str):
    """Twenty stores (twenty connections, as twenty API replicas would hold) post a message
    to one thread at once: exactly one becomes turn 1, the others are refused, naming it."""
    setup = await _open(schema)
    await setup.create_thread(new_thread())
    posters = [await _open(schema, pool_size=1) for _ in range(20)]
    barrier = asyncio.Barrier(len(posters))

    async def post(n: int, s: PostgresStore):
        await barrier.wait()
        try:
            return (await s.create_turn(new_turn(f"r{n:02d}")))[0]
        except TurnInProgress as exc:
            return exc

    try:
        results = await asyncio.gather(*(post(n, s) for n, s in enumerate(posters)))
    finally:
        for s in posters:
            await s.close()
    made = [r for r in results if not isinstance(r, TurnInProgress)]
    assert len(made) == 1 and made[0].turn == 1
    assert {r.run_id for r in results if isinstance(r, TurnInProgress)} == {made[0].id}
    assert [r.id for r in await setup.list_turns("th1")] == [made[0].id]
    await setup.close()

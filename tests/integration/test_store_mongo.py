"""MongoDB passes the shared store conformance suite, and stays correct under concurrency.

MongoDB is the one optional service, even in CI: the server-backed tests run only when
``ALPACA_TEST_MONGO_URL`` names a replica set (or a mongos) and are skipped otherwise; when the
variable is set but the server does not answer, they fail. Each test gets a fresh random
database, dropped afterwards. The unit tests at the end need no server and always run.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import bson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, DuplicateKeyError, ServerSelectionTimeoutError
from pymongo.uri_parser import parse_uri

from alpaca_engine.budget import BudgetExceeded
from alpaca_engine.errors import ApprovalConflict, LeaseLost, NotFound
from alpaca_engine.faults import Fault, StoreUnavailable
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.factory import make_store
from alpaca_engine.store.mongo import (
    COLLECTIONS,
    MIGRATIONS,
    MongoStore,
    TransactionsUnsupported,
    database_from_url,
    decode,
    encode,
    require_transactions,
)
from alpaca_engine.store.records import (
    ApprovalRecord,
    ApprovalStatus,
    AuditEvent,
    LedgerRecord,
    StepKind,
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
)

MONGO_URL = os.environ.get("ALPACA_TEST_MONGO_URL", "")
KEY = b"k"

needs_mongo = pytest.mark.skipif(
    not MONGO_URL,
    reason="ALPACA_TEST_MONGO_URL is not set (MongoDB is optional, even in CI; point it at a "
    "replica set, e.g. mongodb://127.0.0.1:27017/?replicaSet=rs0, to run these tests)",
)


def _with_database(url: str, name: str) -> str:
    """``url`` with its path (database) replaced by ``name``, options kept."""
    scheme, _, rest = url.partition("://")
    hosts_and_path, q, options = rest.partition("?")
    hosts = hosts_and_path.split("/", 1)[0]
    return f"{scheme}://{hosts}/{name}{q}{options}"


async def _open(database: str) -> MongoStore:
    s = MongoStore(MONGO_URL, audit_key=KEY, database=database, connect_timeout=5)
    try:
        await s.open()
    except StoreUnavailable as exc:  # unreachable, or a standalone without transactions
        pytest.fail(
            f"ALPACA_TEST_MONGO_URL is set but MongoDB is unreachable: {exc}", pytrace=False
        )
    return s


@pytest.fixture
async def database() -> AsyncIterator[str]:
    name = f"alpaca_test_{uuid.uuid4().hex[:12]}"
    yield name
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        MONGO_URL, serverSelectionTimeoutMS=5000
    )
    try:
        await client.drop_database(name)
    except ConnectionFailure:
        pass  # unreachable: the test itself already failed saying so
    finally:
        await client.close()


@pytest.fixture
async def store(database: str) -> AsyncIterator[MongoStore]:
    s = await _open(database)
    yield s
    await s.close()


@needs_mongo
class TestMongo(StoreConformance, LedgerApprovalKeyConformance, WorkflowConformance,
                ThreadConformance):
    pass  # uses the fresh-database ``store`` fixture above


# -- concurrency (transactions, write conflicts, retries) -------------------------------------


@needs_mongo
async def test_concurrent_claim_next_claims_each_run_exactly_once(database: str) -> None:
    setup = await _open(database)
    ids = [f"r{i:02d}" for i in range(8)]
    for i, rid in enumerate(ids):
        await setup.create_run(new_run(rid, at=float(i)))
    workers = [await _open(database) for _ in range(12)]
    barrier = asyncio.Barrier(len(workers))

    async def work(n: int, s: MongoStore) -> Any:
        await barrier.wait()
        return await s.claim_next(f"w{n}", 30, 1000)

    try:
        claims = await asyncio.gather(*(work(n, s) for n, s in enumerate(workers)))
    finally:
        for s in workers:
            await s.close()
    won = [c for c in claims if c is not None]
    assert sorted(c.id for c in won) == ids  # every run once, none twice
    assert claims.count(None) == len(workers) - len(ids)
    for run in await setup.list_runs():
        assert run.state == RunState.RUNNING and run.epoch == 1
        records = await setup.list_audit(run.id)
        assert [r.kind for r in records] == ["state.changed"]
        assert verify_chain(records, key=KEY).ok
    await setup.close()


@needs_mongo
async def test_concurrent_audit_and_steps_from_two_stores_keep_one_chain(database: str) -> None:
    a, b = await _open(database), await _open(database)
    try:
        await a.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        run = await a.claim_run("r1", "w", 60, 100)
        assert run is not None
        n = 10

        async def appender(s: MongoStore, tag: str) -> None:
            for i in range(n):
                events = [
                    AuditEvent(kind=f"{tag}.a", data={"i": i}),
                    AuditEvent(kind=f"{tag}.b", data={"i": i}),
                ]
                await s.append_audit("r1", events, 101, epoch=run.epoch)

        async def stepper(s: MongoStore, base: int) -> None:
            for i in range(n):
                step = StepRecord(
                    run_id="r1",
                    seq=base + i,
                    kind=StepKind.TOOL,
                    name="t",
                    input={"i": i},
                    started_at=101,
                )
                await s.save_step(step, run.epoch, [AuditEvent(kind="step")])

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


@needs_mongo
async def test_stale_epoch_is_refused_across_store_instances(database: str) -> None:
    a, b = await _open(database), await _open(database)
    try:
        await a.create_run(new_run("r1"))
        old = await a.claim_run("r1", "w1", 10, 100)
        new = await b.claim_run("r1", "w2", 10, 100, steal=True)
        assert old and new and new.epoch == old.epoch + 1
        step = StepRecord(run_id="r1", seq=1, kind=StepKind.TOOL, name="t")
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


@needs_mongo
async def test_concurrent_steal_and_write_never_commit_a_stale_write(database: str) -> None:
    """A writer racing a steal either commits before it (its step then predates the new
    epoch) or is refused; never a step written under a stale epoch after the steal."""
    a, b = await _open(database), await _open(database)
    try:
        for i in range(10):
            rid = f"r{i}"
            await a.create_run(new_run(rid))
            old = await a.claim_run(rid, "w1", 10, 100)
            assert old is not None
            step = StepRecord(run_id=rid, seq=1, kind=StepKind.TOOL, name="t")
            write = a.save_step(step, old.epoch, [AuditEvent(kind="written")])
            steal = b.claim_run(rid, "w2", 10, 100, steal=True)
            outcome = await asyncio.gather(write, steal, return_exceptions=True)
            assert not isinstance(outcome[1], BaseException)
            kinds = [r.kind for r in await a.list_audit(rid)]
            if isinstance(outcome[0], LeaseLost):
                assert "written" not in kinds and await a.list_steps(rid) == []
            else:
                assert outcome[0] is None
                assert kinds.index("written") < len(kinds) - 2  # before the steal's records
            assert verify_chain(await a.list_audit(rid), key=KEY).ok
    finally:
        await a.close()
        await b.close()


@needs_mongo
async def test_concurrent_reservations_on_a_shared_ledger_never_overspend(database: str) -> None:
    setup = await _open(database)
    await setup.create_run(
        new_run("root").model_copy(update={"ledgers": ["root"]}),
        ledger=LedgerRecord(id="root", limits={"tool_calls": 7}),
    )
    n_stores, per_store = 4, 5
    epochs = {}
    for w in range(n_stores):
        for i in range(per_store):
            rid = f"root.w{w}.{i}"
            await setup.create_run(new_run(rid).model_copy(update={"ledgers": ["root"]}))
            run = await setup.claim_run(rid, "w", 60, 100)
            assert run is not None
            epochs[rid] = run.epoch
    stores = [await _open(database) for _ in range(n_stores)]
    barrier = asyncio.Barrier(n_stores * per_store)

    async def reserve(s: MongoStore, rid: str) -> bool:
        step = StepRecord(run_id=rid, seq=1, kind=StepKind.TOOL, name="t", started_at=101)
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
            *(reserve(s, f"root.w{w}.{i}") for w, s in enumerate(stores) for i in range(per_store))
        )
    finally:
        for s in stores:
            await s.close()
    try:
        assert results.count(True) == 7
        ledger = await setup.get_ledger("root")
        assert ledger.used == {"tool_calls": 7} and ledger.exhausted == "tool_calls"
        written = 0
        for rid in epochs:
            steps = await setup.list_steps(rid)
            written += len(steps)
            kinds = [r.kind for r in await setup.list_audit(rid)]
            assert kinds.count("budget.reserved") == len(steps)  # refused: no audit either
        assert written == 7
    finally:
        await setup.close()


@needs_mongo
async def test_concurrent_decisions_on_one_approval_exactly_one_wins(database: str) -> None:
    a, b = await _open(database), await _open(database)
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

        async def decide(s: MongoStore, who: str, approve: bool) -> object:
            await barrier.wait()
            try:
                return await s.decide_approval(
                    "ap1", approve=approve, by=who, comment=who, now=103, tenant="t1"
                )
            except ApprovalConflict as exc:
                return exc

        outcomes = await asyncio.gather(decide(a, "sue", True), decide(b, "bob", False))
        won = [o for o in outcomes if isinstance(o, ApprovalRecord)]
        assert len(won) == 1 and sum(isinstance(o, ApprovalConflict) for o in outcomes) == 1
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


@needs_mongo
async def test_concurrent_creates_with_one_idempotency_key_make_one_run(database: str) -> None:
    stores = [await _open(database) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                s.create_run(new_run(f"r{i}", key="same"), [AuditEvent(kind="run.created")])
                for i, s in enumerate(stores)
            )
        )
        assert [created for _run, created in results].count(True) == 1
        assert len({run.id for run, _created in results}) == 1
        assert len(await stores[0].list_runs()) == 1
    finally:
        for s in stores:
            await s.close()


# -- schema, values, factory ------------------------------------------------------------------


@needs_mongo
async def test_indexes_are_versioned_and_idempotent(database: str) -> None:
    stores = await asyncio.gather(*(_open(database) for _ in range(4)))  # racing openers
    try:
        s = stores[0]
        assert await s.schema_version() == len(MIGRATIONS)
        assert await s.upgrade() == []  # nothing pending the second time
        db = s._database
        assert sorted(await db.list_collection_names()) == sorted(COLLECTIONS)
        versions = await db["schema_migrations"].find().sort("_id").to_list()
        assert [d["_id"] for d in versions] == list(range(1, len(MIGRATIONS) + 1))
        info = await db["runs"].index_information()
        assert info["runs_idem"]["unique"] is True
        assert info["runs_idem"]["partialFilterExpression"] == {
            "idempotency_key": {"$type": "string"}
        }
        for coll, index in (
            ("steps", "steps_run_seq"),
            ("audit", "audit_run_seq"),
            ("approvals", "approvals_step"),
            ("api_keys", "api_keys_hash"),
        ):
            assert (await db[coll].index_information())[index]["unique"] is True
    finally:
        for st_ in stores:
            await st_.close()
    with pytest.raises(RuntimeError, match="not open"):
        await stores[0].get_run("r1")


@needs_mongo
async def test_payloads_round_trip_exactly(store: MongoStore) -> None:
    """Keys MongoDB reserves, NUL, huge integers and int/float must survive: the chain
    re-verifies and steps read back what was written (also through an upsert's $set)."""
    data = {
        "$ref": "#/defs/x",
        "a.b": {"$in": [1, 2.0]},
        "~int": "7",
        "~": "t",
        "n\u0000ul": 1,
        "big": 2**70,
        "neg": -(2**64),
        "edge": 2**63 - 1,
        "f": 1.0,
        "e": 1e20,
        "s": "é\u2028",
    }
    await store.create_run(new_run("r1"), [AuditEvent(kind="odd", data=data)])
    [record] = await store.list_audit("r1")
    assert json.dumps(record.data) == json.dumps(data)  # same keys, order, types and values
    assert verify_chain([record], key=KEY).ok
    run = await store.claim_run("r1", "w", 60, 100)
    assert run is not None
    step = StepRecord(run_id="r1", seq=1, kind=StepKind.TOOL, name="t", input=data, output=[data])
    await store.save_step(step, run.epoch)
    step.status = StepStatus.COMPLETED
    step.output = {"$set": data}
    await store.save_step(step, run.epoch)  # the update path ($set of an existing step)
    [saved] = await store.list_steps("r1")
    assert json.dumps(saved.input) == json.dumps(data)
    assert json.dumps(saved.output) == json.dumps({"$set": data})


@needs_mongo
async def test_factory_uses_the_url_database(database: str) -> None:
    url = _with_database(MONGO_URL, database)
    s = make_store(url, audit_key=KEY)
    assert isinstance(s, MongoStore) and s.database == database
    await s.open()
    try:
        assert await s.schema_version() == len(MIGRATIONS)
        await s.create_run(new_run("r1"), [AuditEvent(kind="run.created")])
        assert [r.kind for r in await s.list_audit("r1")] == ["run.created"]
    finally:
        await s.close()


# -- unit tests: no server needed ---------------------------------------------------------------


async def test_constructing_a_store_does_not_connect() -> None:
    s = MongoStore("mongodb://localhost:1/x")
    assert s.database == "x" and s.audit_key is None and s._client is None
    with pytest.raises(RuntimeError, match="not open"):
        await s.get_run("r1")
    with pytest.raises(RuntimeError, match="not open"):
        await s.claim_next("w", 10, 1)
    await s.close()  # closing a store that never opened is fine
    assert MongoStore("mongodb://h/x", database="y").database == "y"
    assert MongoStore("mongodb://h").database == "alpaca"


def test_factory_makes_a_mongo_store_for_both_schemes() -> None:
    for url, db in (("mongodb://localhost:1/x", "x"), ("mongodb+srv://cluster.example/y", "y")):
        s = make_store(url, audit_key=b"key")
        assert isinstance(s, MongoStore)
        assert s.url == url and s.database == db and s.audit_key == b"key"


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://localhost",
        "mongodb://localhost/",
        "mongodb://localhost:27017/app",
        "mongodb://u:p%40ss@h1:1,h2:2/app?replicaSet=rs0&w=majority",
        "mongodb://h/app.coll",
        "mongodb://h/?replicaSet=rs0",
        "mongodb://h/my%2Ddb?appName=a",
    ],
)
def test_database_from_url_agrees_with_pymongo(url: str) -> None:
    expected = parse_uri(url)["database"] or "alpaca"
    assert database_from_url(url) == expected


def test_database_from_url_rejects_other_schemes() -> None:
    assert database_from_url("mongodb+srv://cluster.example/db?retryWrites=true") == "db"
    with pytest.raises(ValueError, match="not a MongoDB URL"):
        database_from_url("postgresql://h/db")


def test_a_standalone_server_is_refused_with_a_clear_error() -> None:
    require_transactions({"isWritablePrimary": True, "setName": "rs0"})
    require_transactions({"isWritablePrimary": True, "msg": "isdbgrid"})
    with pytest.raises(TransactionsUnsupported, match="replica set"):
        require_transactions({"isWritablePrimary": True, "maxWireVersion": 21})


async def test_open_fails_fast_on_an_unreachable_server_and_stays_closed() -> None:
    s = MongoStore("mongodb://127.0.0.1:1/x", connect_timeout=0.2)
    with pytest.raises(StoreUnavailable, match=r"no MongoDB server answered within 0\.2 s") as e:
        await s.open()
    assert e.value.fault == Fault.UNREACHABLE
    assert isinstance(e.value.__cause__, ServerSelectionTimeoutError)
    assert s._client is None
    with pytest.raises(RuntimeError, match="not open"):
        await s.list_steps("r1")


def _stored(value: Any) -> Any:
    """What a value becomes after encode -> BSON -> decode."""
    return decode(bson.decode(bson.encode({"v": encode(value)}))["v"])


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(st.characters(codec="utf-8")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(codec="utf-8")), children, max_size=4)
    ),
    max_leaves=25,
)


@given(_json)
def test_any_json_value_round_trips_through_bson(value: Any) -> None:
    expected = json.loads(json.dumps(value))
    assert json.dumps(_stored(value)) == json.dumps(expected)


def test_codec_examples() -> None:
    odd = {"$ref": 1, "a.b": 2, "~": 3, "~int": "4", "x\u0000y": 5, "~t": 6, "ok": 7}
    assert encode(odd) == {
        "~sref": 1,
        "a~db": 2,
        "~t": 3,
        "~tint": "4",
        "x~0y": 5,
        "~tt": 6,
        "ok": 7,
    }
    assert _stored(odd) == odd
    assert encode(2**64) == {"~int": str(2**64)} and _stored(2**64) == 2**64
    big = _stored(2**63 - 1)  # int64 comes back as bson Int64: returned as a plain int
    assert big == 2**63 - 1 and type(big) is int
    assert _stored((1, 2.5)) == [1, 2.5] and type(_stored(1.0)) is float
    with pytest.raises(ValueError, match="invalid escape"):
        decode({"bad~": 1})


# -- the store's logic on an in-memory stand-in for the driver (no server) --------------------
#
# Not MongoDB: a small model of exactly the PyMongo async surface MongoStore uses (filters with
# equality / $gt / $lt / $ne / $type, $set / $inc / $setOnInsert, upserts, sorted cursors,
# unique and partial unique indexes, sessions). Every document goes through real BSON on the
# way in and out, so the value codec, Int64 decoding and BSON's limits are the real ones.
# Transactions are modelled as fully serialized with rollback on error: this runs the shared
# conformance suite against the store's logic, not against MongoDB's concurrency (the
# server-backed tests above do that).

_TYPE_RANK = {type(None): 0, bool: 3, int: 1, float: 1, str: 2}


def _sort_key(value: Any) -> tuple[int, Any]:
    rank = _TYPE_RANK.get(type(value), 1 if isinstance(value, int | float) else 4)
    return rank, value if rank else 0


def _bson_copy(doc: dict[str, Any]) -> dict[str, Any]:
    return bson.decode(bson.encode(doc))


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    for field, cond in query.items():
        value = doc.get(field)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            for op, arg in cond.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if op == "$ne" and value == arg:
                    return False
                if op in ("$gt", "$lt") and not (
                    (numeric or isinstance(value, str))
                    and type(arg) in (int, float, str)
                    and isinstance(value, str) == isinstance(arg, str)
                    and (value > arg if op == "$gt" else value < arg)
                ):
                    return False
                if op == "$type" and not (arg == "string" and isinstance(value, str)):
                    return False
                if op not in ("$ne", "$gt", "$lt", "$type"):
                    raise NotImplementedError(op)
        elif value != cond or (cond is not None and field not in doc):
            return False
    return True


class _FakeCursor:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self._docs = docs

    def sort(self, key: Any, direction: int = 1) -> _FakeCursor:
        keys = [(key, direction)] if isinstance(key, str) else list(key)
        for field, way in reversed(keys):  # stable sorts, last key first

            def by(doc: dict[str, Any], field: str = field) -> tuple[int, Any]:
                return _sort_key(doc.get(field))

            self._docs.sort(key=by, reverse=way < 0)
        return self

    def limit(self, n: int) -> _FakeCursor:
        self._docs = self._docs[:n] if n else self._docs
        return self

    async def to_list(self) -> list[dict[str, Any]]:
        return [_bson_copy(d) for d in self._docs]


class _FakeCollection:
    def __init__(self, db: _FakeDatabase, name: str) -> None:
        self.db, self.name = db, name
        self.docs: list[dict[str, Any]] = []
        self.unique: list[tuple[list[str], dict[str, Any] | None]] = [(["_id"], None)]

    def _check_unique(self, new: dict[str, Any], old: dict[str, Any] | None) -> None:
        for keys, partial in self.unique:
            if partial is not None and not _matches(new, partial):
                continue
            key = [new.get(k) for k in keys]
            for other in self.docs:
                if other is old or (partial is not None and not _matches(other, partial)):
                    continue
                if [other.get(k) for k in keys] == key:
                    raise DuplicateKeyError(f"E11000 duplicate key {self.name} {keys}", 11000)

    def _store(self, doc: dict[str, Any], replace: dict[str, Any] | None = None) -> None:
        stored = _bson_copy(doc)  # what BSON cannot encode fails here, as in the driver
        self._check_unique(stored, replace)
        self.db.created.add(self.name)
        if replace is not None:
            self.docs[self.docs.index(replace)] = stored
        else:
            self.docs.append(stored)

    def _first(self, query: dict[str, Any], sort: Any = None) -> dict[str, Any] | None:
        found = [d for d in self.docs if _matches(d, query)]
        if sort is not None:
            found = _FakeCursor(found).sort(sort)._docs
        return found[0] if found else None

    @staticmethod
    def _project(doc: dict[str, Any], projection: list[str] | None) -> dict[str, Any]:
        if projection is None:
            return _bson_copy(doc)
        return _bson_copy({k: v for k, v in doc.items() if k == "_id" or k in projection})

    @staticmethod
    def _updated(doc: dict[str, Any], update: dict[str, Any], insert: bool) -> dict[str, Any]:
        out = dict(doc)
        for op, fields in update.items():
            if op not in ("$set", "$inc", "$setOnInsert"):
                raise NotImplementedError(op)
            for field, value in fields.items():
                if op == "$inc":
                    out[field] = out.get(field, 0) + value
                elif op == "$set" or insert:
                    out[field] = value
        return out

    def find(self, query: dict[str, Any], projection: list[str] | None = None,
             session: Any = None) -> _FakeCursor:
        return _FakeCursor([self._project(d, projection) for d in self.docs if _matches(d, query)])

    async def delete_many(self, query: dict[str, Any], session: Any = None) -> None:
        self.docs = [d for d in self.docs if not _matches(d, query)]

    async def update_many(self, query: dict[str, Any], update: dict[str, Any],
                          session: Any = None) -> None:
        for doc in [d for d in self.docs if _matches(d, query)]:
            self._store(self._updated(doc, update, insert=False), replace=doc)

    async def find_one(
        self,
        query: dict[str, Any],
        projection: list[str] | None = None,
        sort: Any = None,
        session: Any = None,
    ) -> dict[str, Any] | None:
        doc = self._first(query, sort)
        return self._project(doc, projection) if doc is not None else None

    async def find_one_and_update(
        self,
        query: dict[str, Any],
        update: dict[str, Any],
        sort: Any = None,
        return_document: bool = False,
        session: Any = None,
    ) -> dict[str, Any] | None:
        doc = self._first(query, sort)
        if doc is None:
            return None
        after = self._updated(doc, update, insert=False)
        self._store(after, replace=doc)
        return _bson_copy(after if return_document else doc)

    async def update_one(
        self,
        query: dict[str, Any],
        update: dict[str, Any],
        upsert: bool = False,
        session: Any = None,
    ) -> Any:
        doc = self._first(query)
        if doc is not None:
            self._store(self._updated(doc, update, insert=False), replace=doc)
            return type("Result", (), {"upserted_id": None})()
        if not upsert:
            return type("Result", (), {"upserted_id": None})()
        seed = {k: v for k, v in query.items() if not isinstance(v, dict)}
        new = self._updated({"_id": bson.ObjectId(), **seed}, update, insert=True)
        self._store(new)
        return type("Result", (), {"upserted_id": new["_id"]})()

    async def insert_one(self, doc: dict[str, Any], session: Any = None) -> None:
        doc.setdefault("_id", bson.ObjectId())  # the driver adds _id to the caller's dict too
        self._store(doc)

    async def insert_many(self, docs: list[dict[str, Any]], session: Any = None) -> None:
        for doc in docs:
            await self.insert_one(doc)

    async def create_indexes(self, models: list[Any]) -> None:
        for model in models:
            spec = model.document
            if spec.get("unique"):
                self.unique.append((list(spec["key"]), spec.get("partialFilterExpression")))
        self.db.created.add(self.name)


class _FakeDatabase:
    def __init__(self) -> None:
        self.collections: dict[str, _FakeCollection] = {}
        self.created: set[str] = set()

    def __getitem__(self, name: str) -> _FakeCollection:
        return self.collections.setdefault(name, _FakeCollection(self, name))

    async def list_collection_names(self) -> list[str]:
        return sorted(self.created)

    async def create_collection(self, name: str) -> None:
        self.created.add(name)


class _FakeServer:
    def __init__(self, hello: dict[str, Any]) -> None:
        self.hello = hello
        self.databases: dict[str, _FakeDatabase] = {}
        self.lock = asyncio.Lock()
        self.clients: list[_FakeClient] = []


class _FakeSession:
    def __init__(self, server: _FakeServer) -> None:
        self.server = server

    async def __aenter__(self) -> _FakeSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def with_transaction(self, body: Any, **options: Any) -> Any:
        assert options["write_concern"].document == {"w": "majority"}
        async with self.server.lock:  # serialized; rolled back when the body raises
            saved = {
                name: {c: list(coll.docs) for c, coll in db.collections.items()}
                for name, db in self.server.databases.items()
            }
            try:
                return await body(self)
            except BaseException:
                for name, colls in saved.items():
                    for c, docs in colls.items():
                        self.server.databases[name].collections[c].docs = docs
                raise


class _FakeAdmin:
    def __init__(self, server: _FakeServer) -> None:
        self.server = server

    async def command(self, name: str) -> dict[str, Any]:
        assert name == "hello"
        return dict(self.server.hello)


class _FakeClient:
    def __init__(self, server: _FakeServer, url: str, **options: Any) -> None:
        self.server, self.url, self.options, self.closed = server, url, options, False
        self.admin = _FakeAdmin(server)
        server.clients.append(self)

    def get_database(self, name: str, **options: Any) -> _FakeDatabase:
        return self.server.databases.setdefault(name, _FakeDatabase())

    def start_session(self) -> _FakeSession:
        return _FakeSession(self.server)

    async def close(self) -> None:
        self.closed = True


def _fake_server(monkeypatch: pytest.MonkeyPatch, **hello: Any) -> _FakeServer:
    server = _FakeServer(hello or {"isWritablePrimary": True, "setName": "rs0"})
    monkeypatch.setattr(
        "alpaca_engine.store.mongo.AsyncMongoClient",
        lambda url, **options: _FakeClient(server, url, **options),
    )
    return server


class TestMongoStoreLogicOnAFakeDriver(
    StoreConformance, LedgerApprovalKeyConformance, WorkflowConformance, ThreadConformance
):
    @pytest.fixture
    async def store(self, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MongoStore]:
        _fake_server(monkeypatch)
        s = MongoStore("mongodb://fake/db", audit_key=KEY, connect_timeout=1)
        await s.open()
        yield s
        await s.close()


async def test_open_on_the_fake_driver_migrates_once(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _fake_server(monkeypatch)
    a, b = MongoStore("mongodb://fake/app", connect_timeout=2.5), MongoStore("mongodb://fake/app")
    await a.open()
    await a.open()  # opening twice is a no-op
    await b.open()
    assert server.clients[0].options == {"serverSelectionTimeoutMS": 2500,
                                         "connectTimeoutMS": 2500}
    assert server.clients[1].options == {}
    assert await a.schema_version() == len(MIGRATIONS)
    assert await b.upgrade() == []
    db = server.databases["app"]
    assert sorted(db.created) == sorted(COLLECTIONS)
    assert (["tenant", "idempotency_key"], {"idempotency_key": {"$type": "string"}}) in db[
        "runs"
    ].unique
    await a.close()
    assert server.clients[0].closed and a._client is None
    await b.close()


async def test_open_refuses_a_standalone_and_closes_its_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _fake_server(monkeypatch, isWritablePrimary=True, maxWireVersion=21)
    s = MongoStore("mongodb://fake/app")
    with pytest.raises(StoreUnavailable, match=r"standalone server.*--replSet rs0") as e:
        await s.open()
    assert e.value.fault == Fault.NO_TRANSACTIONS
    assert isinstance(e.value.__cause__, TransactionsUnsupported)
    assert server.clients[0].closed and s._client is None and "app" not in server.databases


async def test_logic_details_on_the_fake_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Corners the shared suite leaves out: limits, reserve+settle in one write, the step
    upsert rules, a reservation replayed after a crash, cancel of a waiting run."""
    _fake_server(monkeypatch)
    s = MongoStore("mongodb://fake/app", audit_key=KEY)
    await s.open()
    try:
        for i in range(3):
            await s.create_run(new_run(f"r{i}", at=float(i)))
        r0 = await s.claim_run("r0", "w", 10, 1)
        assert r0 is not None
        done = await s.transition("r0", RunState.SUCCEEDED, 2, epoch=r0.epoch, output="out")
        assert done.output == "out" and done.lease_owner is None and done.epoch == r0.epoch
        assert await s.list_runs(limit=0) == []
        assert [r.id for r in await s.list_runs(limit=-1)] == ["r2", "r1", "r0"]
        run = new_run("L").model_copy(update={"ledgers": ["L", "missing"]})
        await s.create_run(run, ledger=LedgerRecord(id="L", limits={"tokens": 100}))
        leased = await s.claim_run("L", "w", 10, 100)
        assert leased is not None
        step = StepRecord(
            run_id="L",
            seq=1,
            kind=StepKind.TOOL,
            name="t",
            input={"a": 1},
            idempotency_key="k1",
            started_at=100,
        )
        await s.save_step(step, leased.epoch, reserve={"tokens": 10}, settle={"tokens": -4})
        assert (await s.get_ledger("L")).used == {"tokens": 6}
        again = StepRecord(
            run_id="L",
            seq=1,
            kind=StepKind.MODEL,
            name="other",
            input={"a": 2},
            idempotency_key="k2",
            started_at=200,
            status=StepStatus.COMPLETED,
        )
        await s.save_step(again, leased.epoch, reserve={"tokens": 50})  # replayed: not twice
        assert again.reserved == {"tokens": 10}
        assert (await s.get_ledger("L")).used == {"tokens": 6}
        [saved] = await s.list_steps("L")
        assert (saved.kind, saved.name, saved.idempotency_key, saved.started_at) == (
            StepKind.TOOL,
            "t",
            "k1",
            100,
        )  # kept from the first write, as SQLite does
        assert (saved.status, saved.input, saved.reserved) == (
            StepStatus.COMPLETED,
            {"a": 2},
            {"tokens": 10},
        )
        with pytest.raises(NotFound):
            await s.get_ledger("missing")
        await s.append_audit("L", [AuditEvent(kind="note")], 100, epoch=leased.epoch)
        with pytest.raises(NotFound):
            await s.save_step(StepRecord(run_id="nope", seq=1, kind=StepKind.TOOL, name="t"), 1)
        with pytest.raises(DuplicateKeyError):  # a run id is unique (SQLite: IntegrityError)
            await s.create_run(new_run("r0"))
        await s.transition("L", RunState.WAITING, 101, epoch=leased.epoch)
        cancelled = await s.request_cancel("L", tenant="t1")
        assert cancelled.state == RunState.CANCELLED and cancelled.error_code == "cancelled"
        assert (await s.request_cancel("L")).state == RunState.CANCELLED  # terminal: unchanged
        assert await s.expire_approvals(1e12) == []
        assert verify_chain(await s.list_audit("L"), key=KEY).ok
    finally:
        await s.close()

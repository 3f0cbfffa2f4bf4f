"""The document store: MongoDB through PyMongo's official async API (``AsyncMongoClient``).

Same semantics as :mod:`.sqlite` (the reference) and :mod:`.postgres`, with MongoDB
multi-document transactions instead of SQL transactions and row locks.

**Deployment.** Multi-document transactions need a replica set or a sharded cluster (MongoDB's
rule; a single-node replica set, ``mongod --replSet rs0`` + ``rs.initiate()``, is enough).
``open()`` asks the server ``hello`` and refuses a standalone server with
:class:`TransactionsUnsupported` instead of failing later at the first write. MongoDB 4.4 or
newer (the oldest server PyMongo 4.20 talks to).

**Collections** (database from the URL path, else ``alpaca``; or ``database=``):

=================== ===========================================================================
``runs``            ``_id`` = run id; unique partial index ``(tenant, idempotency_key)`` over
                    string keys; ``(state, created_at, _id)``, ``(tenant, created_at)``,
                    ``root_id``, ``parent_id``. A ``version`` counter is bumped by every write
                    that must be serialized with the run (see fencing).
``steps``           unique ``(run_id, seq)``.
``audit``           unique ``(run_id, seq)`` (a second guard: the chain head is read inside the
                    transaction that appends).
``ledgers``         ``_id`` = ledger id; ``limits``, ``used``, ``exhausted``, ``version``.
``approvals``       ``_id`` = approval id; unique ``(run_id, step)``; ``(tenant, status,
                    created_at)``; ``(status, expires_at)``.
``api_keys``        ``_id`` = key id; unique ``key_hash``; ``(tenant, created_at)``.
``workflows``       one document per registered workflow version; unique ``(tenant, name,
                    version)``.
``threads``         ``_id`` = thread id; ``(tenant, updated_at)``; a ``version`` lock counter.
                    Turns are ``runs`` with ``thread_id`` and ``turn``: unique ``(thread_id,
                    turn)`` over runs with a string ``thread_id``.
``thread_audit``    a thread's own chain (it survives the thread's deletion); unique
                    ``(run_id, seq)``, ``run_id`` holding the thread id.
``schema_migrations`` one document per applied index-set version (``_id`` = version).
=================== ===========================================================================

``open()`` is the migration: it creates the collections explicitly (so no transaction ever
creates one implicitly) and every pending versioned index set of :data:`MIGRATIONS`, recording
each version in ``schema_migrations``. Creating an existing index with the same spec is a no-op,
so racing openers are safe.

**Transactions and fencing.** Every multi-document write (fence check + step + ledgers + audit
+ run state) runs in one transaction through ``AsyncClientSession.with_transaction`` with read
concern ``snapshot``, write concern ``majority`` and read preference ``primary``. MongoDB
transactions read from a snapshot and detect conflicts on *writes* only: two transactions that
write the same document conflict (``WriteConflict``, labelled ``TransientTransactionError``;
the loser is aborted and ``with_transaction`` re-runs it against a fresh snapshot). So the
first operation of every transaction touching a run is a write to the run document,
``find_one_and_update({"_id": id}, {"$inc": {"version": 1}})``, whose returned document is the
run the epoch is then compared with — the MongoDB counterpart of PostgreSQL's ``SELECT … FOR
UPDATE``. A claim or steal that commits after our snapshot makes our write conflict, the retry
sees the new epoch and raises ``LeaseLost``; a stale write is never committed. The same trick
serializes the other shared documents: budget ledgers are "locked" (version bumped and read in
one ``find_one_and_update``, in id order) before a reservation is checked, so concurrent
reservations on one ledger can never overspend; approvals are locked before a decision, so
exactly one decision wins. The audit chain head is read inside the transaction that holds the
run's lock, and the unique ``(run_id, seq)`` index is a second guard against a forked chain.
``claim_next`` is one atomic ``find_one_and_update({"state": "queued"}, …, sort=[created_at,
_id])`` plus its audit append in the same transaction. Callbacks may run more than once
(retries), so they have no side effect outside the database; results are applied to caller
objects only after the commit.

**Values.** Times are floats (epoch seconds), as in the other stores. JSON-ish fields (budget,
usage, step input/output/error/reserved, audit data, approval arguments, ledger limits/used)
are stored as native BSON sub-documents after the same JSON round trip SQLite does, with two
reversible adjustments so *any* JSON value round-trips exactly (audit records must re-verify):
object keys containing ``~ . $`` or NUL are escaped (``~t ~d ~s ~0``; MongoDB reserves ``$``
and ``.`` in field names and BSON forbids NUL), and integers outside BSON's signed 64-bit range
are stored as ``{"~int": "<digits>"}`` (the tag cannot collide: a literal key ``~int`` is
escaped to ``~tint``). BSON keeps key order and the int/float distinction; ``Int64`` values
come back as plain ``int``. Limits that remain: a document is at most 16 MiB and 100 levels
deep, and strings must be valid Unicode (BSON strings are UTF-8: no lone surrogates).

The two writes outside transactions (``create_api_key``, the ``schema_migrations`` record) and
all plain reads use the URL's write/read concern; reads go to the primary.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, IndexModel, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import CollectionInvalid, DuplicateKeyError, OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from .. import budget as ledger_logic
from ..errors import ApprovalConflict, LeaseLost, NotFound
from ..faults import translating_faults
from ..lifecycle import RunState, check_transition
from ..telemetry.audit import GENESIS, AuditChain, AuditRecord, iso_utc
from . import observers
from .base import Journaled, StepWrite, save_in_turn
from .ownership import Recovery, closed_run_decision, plan_claim
from .ownership import recover as recover_run
from .records import (
    ApiKeyRecord,
    ApprovalRecord,
    ApprovalStatus,
    AuditEvent,
    LedgerRecord,
    RunRecord,
    StepRecord,
    StepStatus,
    ThreadRecord,
    TurnCopy,
    WorkflowRecord,
    thread_not_found,
    unfinished_step_error,
    workflow_not_found,
)
from .thread_rules import (
    ERASED,
    Erased,
    check_deletable,
    next_turn,
    thread_deleted,
    turn_created,
)

Doc = dict[str, Any]
Session = AsyncClientSession
_StepOutcome = tuple[
    ledger_logic.BudgetExceeded | None, dict[str, float] | None, ledger_logic.BudgetExceeded | None
]
_T = TypeVar("_T")

DEFAULT_DATABASE = "alpaca"
COLLECTIONS = ("runs", "steps", "audit", "ledgers", "approvals", "api_keys", "workflows",
               "threads", "thread_audit", "schema_migrations")

Backfill = Callable[[AsyncDatabase[Doc]], Awaitable[None]]
"""A data migration: rewrites documents in place (idempotent, so a racing opener is safe)."""


async def _backfill_audit_heads(db: AsyncDatabase[Doc]) -> None:
    """Version 2: every run document gets its chain head (``audit_seq``, ``audit_hash``) from
    its stored chain, and a crash counter (as SQL migration 3)."""
    runs = await db["runs"].find({}, projection=["_id", "audit_seq", "crash_count"]).to_list()
    for run in runs:
        changes: Doc = {}
        if "audit_seq" not in run:
            last = await db["audit"].find_one(
                {"run_id": run["_id"]}, projection=["seq", "hash"], sort=[("seq", DESCENDING)]
            )
            changes["audit_seq"] = int(last["seq"]) if last else 0
            changes["audit_hash"] = str(last["hash"]) if last else GENESIS
        if "crash_count" not in run:
            changes["crash_count"] = 0
        if changes:
            await db["runs"].update_one({"_id": run["_id"]}, {"$set": changes})


MIGRATIONS: list[dict[str, list[IndexModel]] | Backfill] = [
    # 1: the initial index set
    {
        "runs": [
            IndexModel(
                [("tenant", ASCENDING), ("idempotency_key", ASCENDING)],
                name="runs_idem",
                unique=True,
                partialFilterExpression={"idempotency_key": {"$type": "string"}},
            ),
            IndexModel(
                [("state", ASCENDING), ("created_at", ASCENDING), ("_id", ASCENDING)],
                name="runs_state",
            ),
            IndexModel([("tenant", ASCENDING), ("created_at", DESCENDING)], name="runs_tenant"),
            IndexModel([("root_id", ASCENDING)], name="runs_root"),
            IndexModel([("parent_id", ASCENDING)], name="runs_parent"),
        ],
        "steps": [
            IndexModel(
                [("run_id", ASCENDING), ("seq", ASCENDING)], name="steps_run_seq", unique=True
            ),
        ],
        "audit": [
            IndexModel(
                [("run_id", ASCENDING), ("seq", ASCENDING)], name="audit_run_seq", unique=True
            ),
        ],
        "approvals": [
            IndexModel(
                [("run_id", ASCENDING), ("step", ASCENDING)], name="approvals_step", unique=True
            ),
            IndexModel(
                [("tenant", ASCENDING), ("status", ASCENDING), ("created_at", DESCENDING)],
                name="approvals_status",
            ),
            IndexModel([("status", ASCENDING), ("expires_at", ASCENDING)], name="approvals_expiry"),
        ],
        "api_keys": [
            IndexModel([("key_hash", ASCENDING)], name="api_keys_hash", unique=True),
            IndexModel([("tenant", ASCENDING), ("created_at", ASCENDING)], name="api_keys_tenant"),
        ],
    },
    # 2: nothing new (the SQL stores' migration 2 added tables and columns only)
    {},
    # 3: the audit chain head and the crash counter on every run
    _backfill_audit_heads,
    # 4: registered workflows; the unique key is what keeps concurrent pushes of one name
    # from taking the same version number
    {
        "workflows": [
            IndexModel(
                [("tenant", ASCENDING), ("name", ASCENDING), ("version", DESCENDING)],
                name="workflows_version",
                unique=True,
            ),
        ],
    },
    # 5: threads (DESIGN §10); the unique (thread_id, turn) key guards that two concurrent
    # messages never both become turn N (create_turn also locks the thread document)
    {
        "runs": [
            IndexModel(
                [("thread_id", ASCENDING), ("turn", ASCENDING)],
                name="runs_thread_turn",
                unique=True,
                partialFilterExpression={"thread_id": {"$type": "string"}},
            ),
        ],
        "threads": [
            IndexModel([("tenant", ASCENDING), ("updated_at", DESCENDING)], name="threads_tenant"),
        ],
        "thread_audit": [
            IndexModel(
                [("run_id", ASCENDING), ("seq", ASCENDING)], name="thread_audit_seq", unique=True
            ),
        ],
    },
    # 6: typed outputs: nothing to index (a run without ``output_type`` reads as "text")
    {},
]
"""Versioned index sets and backfills. Append, never edit, a version."""

_PUT_ATTEMPTS = 50
"""Retries of a workflow push that lost the race for its version number to another push."""
_NAMESPACE_EXISTS = 48  # server error code of ``create`` on an existing collection
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_BIGINT = "~int"
_KEY_ESCAPES = {"~": "~t", ".": "~d", "$": "~s", "\0": "~0"}
_KEY_UNESCAPES = {v[1]: k for k, v in _KEY_ESCAPES.items()}


class TransactionsUnsupported(RuntimeError):
    """The server cannot run multi-document transactions (a standalone ``mongod``)."""


# -- URL and topology ---------------------------------------------------------------------------
def database_from_url(url: str, default: str = DEFAULT_DATABASE) -> str:
    """The database named in a ``mongodb://`` / ``mongodb+srv://`` URL path, else ``default``.

    Parsed the way PyMongo's URI parser does (path up to ``?``, percent-decoded, a ``.coll``
    suffix dropped), without resolving anything: constructing a store never touches the network.
    """
    for scheme in ("mongodb://", "mongodb+srv://"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            break
    else:
        raise ValueError(
            f"not a MongoDB URL: {url!r} (expected mongodb://HOST/DB or mongodb+srv://HOST/DB)"
        )
    _hosts, slash, path = rest.partition("?")[0].partition("/")
    name = unquote_plus(path).split(".", 1)[0] if slash else ""
    return name or default


def require_transactions(hello: Mapping[str, Any]) -> None:
    """Raise :class:`TransactionsUnsupported` unless ``hello`` comes from a replica-set member
    (``setName``) or a ``mongos`` router (``msg: isdbgrid``)."""
    if hello.get("setName") or hello.get("msg") == "isdbgrid":
        return
    raise TransactionsUnsupported(
        "MongoStore needs multi-document transactions, which MongoDB only offers on a replica "
        "set or a sharded cluster, and this server is a standalone mongod. Start it as a "
        "(single-node) replica set: `mongod --replSet rs0 ...`, then `rs.initiate()` once."
    )


# -- value codec --------------------------------------------------------------------------------
def _escape_key(key: str) -> str:
    if not any(c in key for c in _KEY_ESCAPES):
        return key
    return "".join(_KEY_ESCAPES.get(c, c) for c in key)


def _unescape_key(key: str) -> str:
    if "~" not in key:
        return key
    out: list[str] = []
    i = 0
    while i < len(key):
        if key[i] == "~":
            code = key[i + 1 : i + 2]
            if code not in _KEY_UNESCAPES:
                raise ValueError(f"stored key {key!r} has an invalid escape at {i}")
            out.append(_KEY_UNESCAPES[code])
            i += 2
        else:
            out.append(key[i])
            i += 1
    return "".join(out)


def _escape(value: Any) -> Any:
    if isinstance(value, dict):
        return {_escape_key(k): _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not (_INT64_MIN <= value <= _INT64_MAX)
    ):
        return {_BIGINT: str(value)}
    return value


def encode(value: Any) -> Any:
    """A JSON-ish value as stored: JSON round trip (as SQLite stores it), then escaped."""
    return _escape(json.loads(json.dumps(value)))


def decode(value: Any) -> Any:
    """The inverse of :func:`encode` for a value read back from BSON (``Int64`` -> ``int``)."""
    if isinstance(value, dict):
        if len(value) == 1 and _BIGINT in value:
            return int(value[_BIGINT])
        return {_unescape_key(k): decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and type(value) is not int:
        return int(value)  # bson.int64.Int64
    return value


def _fields(doc: Mapping[str, Any], id_field: str | None = "id") -> Doc:
    """A stored document as record fields: ``_id`` renamed (or dropped), ``version`` dropped,
    every value decoded."""
    data = {k: decode(v) for k, v in doc.items() if k not in ("_id", "version")}
    if id_field is not None:
        data[id_field] = doc["_id"]
    return data


def _run(doc: Mapping[str, Any]) -> RunRecord:
    return RunRecord.model_validate(_fields(doc))


def _step(doc: Mapping[str, Any]) -> StepRecord:
    return StepRecord.model_validate(_fields(doc, None))


def _approval(doc: Mapping[str, Any]) -> ApprovalRecord:
    return ApprovalRecord.model_validate(_fields(doc))


def _api_key(doc: Mapping[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord.model_validate(_fields(doc))


def _workflow(doc: Mapping[str, Any]) -> WorkflowRecord:
    # Not _fields: a workflow's ``version`` is its number, not a lock counter to drop.
    return WorkflowRecord.model_validate({k: v for k, v in doc.items() if k != "_id"})


def _chained(chain: AuditChain, events: Sequence[AuditEvent], now: float) -> list[Doc]:
    """The documents of ``events`` appended to ``chain`` (which moves to the new head)."""
    stamp = iso_utc(now)
    docs = []
    for ev in events:
        doc = chain.append(ev.kind, ev.data, ev.actor, stamp).to_dict()
        doc["data"] = encode(doc["data"])
        docs.append(doc)
    return docs


def _thread(doc: Mapping[str, Any]) -> ThreadRecord:
    return ThreadRecord.model_validate(_fields(doc))


def _thread_doc(thread: ThreadRecord) -> Doc:
    data = thread.model_dump()
    data["_id"] = data.pop("id")
    data["metadata"] = encode(thread.metadata)
    data["budget"] = encode(thread.budget)
    data["version"] = 0
    return data


def _ledger_state(doc: Mapping[str, Any]) -> ledger_logic.LedgerState:
    return ledger_logic.LedgerState(
        id=str(doc["_id"]),
        limits=decode(doc["limits"]),
        used=decode(doc["used"]),
        exhausted=doc.get("exhausted"),
    )


def _run_doc(run: RunRecord) -> Doc:
    data = run.model_dump()
    data["_id"] = data.pop("id")
    data["state"] = str(run.state)
    data["budget"] = encode(run.budget)
    data["usage"] = encode(run.usage)
    # Stored sorted, as SQLite does (a set of names; None = the agent's own).
    data["capabilities"] = sorted(run.capabilities) if run.capabilities is not None else None
    data["version"] = 0
    return data


def _set_state(
    run: RunRecord, to: RunState, error_code: str | None, reason: str, actor: str = "engine"
) -> AuditEvent:
    check_transition(run.id, run.state, to, error_code)
    return AuditEvent(
        kind="state.changed",
        actor=actor,
        data={"from": str(run.state), "to": str(to), "reason": reason},
    )


@translating_faults
class MongoStore:
    """The :class:`~.base.Store` on MongoDB (replica set or sharded cluster).

    ``database`` overrides the URL's database (tests use a fresh one each); ``connect_timeout``
    (seconds) sets ``serverSelectionTimeoutMS`` (``None``: the URL's or PyMongo's default).
    Constructing a store does no I/O; :meth:`open` connects, checks the topology and creates
    the collections and indexes.
    """

    migrations_applied: tuple[int, ...] = ()
    """What the last :meth:`open` applied (``alpaca db upgrade`` reports it)."""

    def __init__(
        self,
        url: str,
        audit_key: bytes | None = None,
        *,
        database: str | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.audit_key = audit_key
        self.database = database or database_from_url(url)
        self.connect_timeout = connect_timeout
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None

    # -- connection and schema -------------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            return
        options: dict[str, Any] = {}
        if self.connect_timeout is not None:
            timeout_ms = max(1, int(self.connect_timeout * 1000))
            options["serverSelectionTimeoutMS"] = timeout_ms
            options["connectTimeoutMS"] = timeout_ms
        client: AsyncMongoClient[Doc] = AsyncMongoClient(self.url, **options)
        try:
            require_transactions(await client.admin.command("hello"))
            self._client = client
            self._db = client.get_database(self.database, read_preference=ReadPreference.PRIMARY)
            self.migrations_applied = tuple(await self.upgrade())
        except BaseException:
            self._client = self._db = None
            await client.close()
            raise

    async def close(self) -> None:
        if self._client is not None:
            client, self._client, self._db = self._client, None, None
            await client.close()

    @property
    def _database(self) -> AsyncDatabase[Doc]:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    def _c(self, name: str) -> AsyncCollection[Doc]:
        return self._database[name]

    async def schema_version(self) -> int:
        doc = await self._c("schema_migrations").find_one({}, sort=[("_id", DESCENDING)])
        return int(doc["_id"]) if doc is not None else 0

    async def upgrade(self) -> list[int]:
        """Create missing collections, then apply pending index sets in order; return the
        versions this call recorded (a racing opener records none of the same)."""
        db = self._database
        existing = set(await db.list_collection_names())
        for name in COLLECTIONS:
            if name in existing:
                continue
            try:
                await db.create_collection(name)
            except CollectionInvalid:  # pragma: no cover - created since the listing
                pass
            except OperationFailure as exc:  # pragma: no cover - server-side race
                if exc.code != _NAMESPACE_EXISTS:
                    raise
        current = await self.schema_version()
        applied: list[int] = []
        for version, index_set in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            if callable(index_set):
                await index_set(db)
            else:
                for name, indexes in index_set.items():
                    await db[name].create_indexes(indexes)
            try:
                result = await db["schema_migrations"].update_one(
                    {"_id": version}, {"$setOnInsert": {"version": version}}, upsert=True
                )
            except DuplicateKeyError:  # pragma: no cover - a racing opener recorded it
                continue
            if result.upserted_id is not None:
                applied.append(version)
        return applied

    async def _tx(self, body: Callable[[Session], Awaitable[_T]]) -> _T:
        """Run ``body`` in one transaction (re-run on transient errors, e.g. write conflicts);
        any exception it raises aborts the transaction and propagates."""
        if self._client is None:
            raise RuntimeError("store is not open")
        async def attempt(session: Session) -> _T:
            observers.restart()  # a re-run attempt: what the aborted one wrote never happened
            return await body(session)

        with observers.transaction():
            async with self._client.start_session() as session:
                return await session.with_transaction(
                    attempt,
                    read_concern=ReadConcern("snapshot"),
                    write_concern=WriteConcern("majority"),
                    read_preference=ReadPreference.PRIMARY,
                )

    # -- locking helpers (writes that make concurrent transactions conflict) --------------------
    async def _lock_run(
        self, s: Session, run_id: str, epoch: int | None, *, journal: bool = False
    ) -> RunRecord:
        """Bump the run's version (our transaction now conflicts with any other writer of the
        run) and check the epoch on the document that write returned. A stale epoch raises
        inside the transaction, which aborts it, so the bump is rolled back: the same effect
        as putting the epoch in the filter, with one round trip and a clear NotFound."""
        doc = await self._c("runs").find_one_and_update(
            {"_id": run_id},
            {"$inc": {"version": 1}},
            return_document=ReturnDocument.AFTER,
            session=s,
        )
        if doc is None:
            raise NotFound(f"run {run_id} not found")
        run = _run(doc)
        if epoch is not None and run.epoch != epoch:
            raise LeaseLost(run_id, epoch)
        if journal and run.state.terminal:  # a finished run's chain ends with its terminal record
            raise LeaseLost(run_id, -1 if epoch is None else epoch)
        return run

    async def _lock_ledgers(self, s: Session, ids: Sequence[str]) -> list[ledger_logic.LedgerState]:
        """Lock (version bump) and read the run's ledgers in id order; return them in the run's
        order (root first), skipping ids without a ledger, as SQLite does."""
        order = list(dict.fromkeys(ids))
        states: dict[str, ledger_logic.LedgerState] = {}
        for lid in sorted(order):
            doc = await self._c("ledgers").find_one_and_update(
                {"_id": lid},
                {"$inc": {"version": 1}},
                return_document=ReturnDocument.AFTER,
                session=s,
            )
            if doc is not None:
                states[lid] = _ledger_state(doc)
        return [states[lid] for lid in order if lid in states]

    async def _debit(
        self, s: Session, ledgers: list[ledger_logic.LedgerState], amounts: dict[str, float]
    ) -> None:
        for ledger in ledgers:
            ledger_logic.apply(ledger, amounts)
            await self._c("ledgers").update_one(
                {"_id": ledger.id}, {"$set": {"used": encode(ledger.used)}}, session=s
            )

    async def _append(
        self,
        s: Session,
        run_id: str,
        events: Sequence[AuditEvent],
        now: float,
        head: tuple[int, str],
    ) -> tuple[int, str]:
        """Append to the run's chain after ``head`` and move the head on the run document;
        callers hold the run's lock (or just inserted the run) and read ``head`` from it."""
        if not events:
            return head
        observers.written(run_id, events)
        chain = AuditChain(run_id, self.audit_key, *head)
        await self._c("audit").insert_many(_chained(chain, events, now), session=s)
        await self._c("runs").update_one(
            {"_id": run_id},
            {"$set": {"audit_seq": chain.last_seq, "audit_hash": chain.last_hash}},
            session=s,
        )
        return chain.last_seq, chain.last_hash

    async def _recover(self, s: Session, run: RunRecord, rec: Recovery, now: float) -> None:
        """Write a crash recovery: requeued (lease cleared, epoch bumped) or quarantined."""
        changes: Doc = {
            "state": str(rec.state),
            "lease_owner": None,
            "lease_expires_at": None,
            "crash_count": rec.crash_count,
            "updated_at": now,
        }
        if rec.error_code is not None:
            changes["error_code"] = rec.error_code
            changes["error_message"] = rec.error_message
        await self._c("runs").update_one(
            {"_id": run.id}, {"$set": changes, "$inc": {"epoch": 1}}, session=s
        )
        await self._append(s, run.id, rec.events, now, run.audit_head)

    # -- runs ----------------------------------------------------------------------------------
    async def create_run(
        self,
        run: RunRecord,
        audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        async def body(s: Session) -> tuple[RunRecord, bool]:
            found = await self._idempotent(s, run)
            if found is not None:
                return found, False
            return await self._insert_run(s, run, audit, ledger), True

        return await self._create(body, run)

    async def _create(self, body: Callable[[Session], Awaitable[tuple[RunRecord, bool]]],
                      run: RunRecord) -> tuple[RunRecord, bool]:
        """Run a transaction inserting ``run``; when the same idempotency key committed
        concurrently (the unique index refused ours), that run wins."""
        try:
            return await self._tx(body)
        except DuplicateKeyError:
            found = await self._idempotent(None, run)
            if found is not None:
                return found, False
            raise

    async def _idempotent(self, s: Session | None, run: RunRecord) -> RunRecord | None:
        """The run the tenant's idempotency key of ``run`` already names, if any."""
        if not run.idempotency_key:
            return None
        found = await self._c("runs").find_one(
            {"tenant": run.tenant, "idempotency_key": run.idempotency_key}, session=s
        )
        return _run(found) if found is not None else None

    async def _insert_run(self, s: Session, run: RunRecord, audit: Sequence[AuditEvent],
                          ledger: LedgerRecord | None) -> RunRecord:
        """Insert a new run (and its ledger) and start its chain; returns it with its head."""
        run = run.with_head((0, GENESIS))
        await self._c("runs").insert_one(_run_doc(run), session=s)
        if ledger is not None:
            await self._insert_ledger(s, ledger, run.created_at)
        return run.with_head(await self._append(s, run.id, audit, run.created_at, (0, GENESIS)))

    async def _insert_ledger(self, s: Session, ledger: LedgerRecord, now: float) -> None:
        await self._c("ledgers").insert_one(
            {
                "_id": ledger.id,
                "limits": encode(ledger.limits),
                "used": encode(ledger.used),
                "exhausted": ledger.exhausted,
                "updated_at": now,
                "version": 0,
            },
            session=s,
        )

    async def get_run(self, run_id: str, tenant: str | None = None) -> RunRecord:
        doc = await self._c("runs").find_one({"_id": run_id})
        if doc is None or (tenant is not None and doc["tenant"] != tenant):
            raise NotFound(f"run {run_id} not found")
        return _run(doc)

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        state: RunState | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        if limit == 0:  # LIMIT 0 in SQL; a Mongo limit of 0 means "no limit"
            return []
        query = {
            col: str(val)
            for col, val in (
                ("tenant", tenant),
                ("state", state),
                ("root_id", root_id),
                ("parent_id", parent_id),
            )
            if val is not None
        }
        cursor = self._c("runs").find(query).sort([("created_at", DESCENDING), ("_id", DESCENDING)])
        if limit > 0:  # a negative limit means "no limit", as in SQLite
            cursor = cursor.limit(limit)
        return [_run(d) for d in await cursor.to_list()]

    async def claim_run(
        self,
        run_id: str,
        owner: str,
        lease_seconds: float,
        now: float,
        *,
        steal: bool = False,
        expected_epoch: int | None = None,
        max_attempts: int | None = None,
    ) -> RunRecord | None:
        async def body(s: Session) -> RunRecord | None:
            run = await self._lock_run(s, run_id, None)
            plan = plan_claim(
                run, owner, now, steal=steal, expected_epoch=expected_epoch,
                max_attempts=max_attempts,
            )
            if plan is None:
                return None
            if plan.quarantine is not None:
                await self._recover(s, run, plan.quarantine, now)
                return None
            doc = await self._c("runs").find_one_and_update(
                {"_id": run.id},
                {
                    "$set": {
                        "state": str(RunState.RUNNING),
                        "lease_owner": owner,
                        "lease_expires_at": now + lease_seconds,
                        "epoch": run.epoch + 1,
                        "crash_count": plan.crash_count,
                        "updated_at": now,
                    }
                },
                return_document=ReturnDocument.AFTER,
                session=s,
            )
            head = await self._append(s, run.id, plan.events, now, run.audit_head)
            return _run(doc).with_head(head) if doc is not None else None

        return await self._tx(body)

    async def claim_next(self, owner: str, lease_seconds: float, now: float) -> RunRecord | None:
        """Lease the oldest queued run: one atomic find-and-modify (two workers racing for the
        same run conflict; the loser's transaction re-runs and takes the next one)."""

        async def body(s: Session) -> RunRecord | None:
            doc = await self._c("runs").find_one_and_update(
                {"state": str(RunState.QUEUED)},
                {
                    "$set": {
                        "state": str(RunState.RUNNING),
                        "lease_owner": owner,
                        "lease_expires_at": now + lease_seconds,
                        "updated_at": now,
                    },
                    "$inc": {"epoch": 1, "version": 1},
                },
                sort=[("created_at", ASCENDING), ("_id", ASCENDING)],
                return_document=ReturnDocument.AFTER,
                session=s,
            )
            if doc is None:
                return None
            run = _run(doc)
            before = run.model_copy(update={"state": RunState.QUEUED})
            event = _set_state(before, RunState.RUNNING, None, f"claimed by {owner}")
            return run.with_head(await self._append(s, run.id, [event], now, run.audit_head))

        return await self._tx(body)

    async def renew_lease(
        self, run_id: str, owner: str, epoch: int, lease_seconds: float, now: float
    ) -> None:
        async def body(s: Session) -> None:
            run = await self._lock_run(s, run_id, epoch)
            if run.state != RunState.RUNNING or run.lease_owner != owner:
                raise LeaseLost(run_id, epoch)
            await self._c("runs").update_one(
                {"_id": run_id}, {"$set": {"lease_expires_at": now + lease_seconds}}, session=s
            )

        await self._tx(body)

    async def transition(
        self,
        run_id: str,
        to: RunState,
        now: float,
        *,
        epoch: int | None = None,
        output: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        usage: dict[str, Any] | None = None,
        audit: Sequence[AuditEvent] = (),
        output_type: str | None = None,
        steps: Sequence[StepWrite] = (),
    ) -> RunRecord:
        """With ``steps``, the plain form: :meth:`save_steps` (their own transactions), then
        the move in its own, made only if every write was."""
        if steps:
            if epoch is None:
                raise ValueError("journal writes need the lease's epoch")
            await self.save_steps(steps, epoch)

        async def body(s: Session) -> RunRecord:
            run = await self._lock_run(s, run_id, epoch)
            return await self._transition(
                s,
                run,
                to,
                now,
                epoch=epoch,
                output=output,
                error_code=error_code,
                error_message=error_message,
                usage=usage,
                audit=audit,
                output_type=output_type,
            )

        return await self._tx(body)

    async def _transition(
        self,
        s: Session,
        run: RunRecord,
        to: RunState,
        now: float,
        *,
        epoch: int | None,
        output: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        usage: dict[str, Any] | None = None,
        audit: Sequence[AuditEvent] = (),
        output_type: str | None = None,
    ) -> RunRecord:
        """The body of :meth:`transition` for a run this transaction has locked."""
        if epoch is None and run.state == RunState.RUNNING and to != RunState.QUEUED:
            raise LeaseLost(run.id, -1)
        reason = error_message or ("finished" if to.terminal else str(to))
        event = _set_state(run, to, error_code, reason)
        event.data.update({"error_code": error_code} if error_code else {})
        keep_lease = to == RunState.RUNNING
        changes: Doc = {
            "state": str(to),
            "error_code": error_code,
            "error_message": error_message,
            "updated_at": now,
            "epoch": run.epoch if keep_lease or epoch is not None else run.epoch + 1,
        }
        if output is not None:
            changes["output"] = output
        if output_type is not None:
            changes["output_type"] = output_type
        if usage is not None:
            changes["usage"] = encode(usage)
        if not keep_lease:
            changes["lease_owner"] = None
            changes["lease_expires_at"] = None
        doc = await self._c("runs").find_one_and_update(
            {"_id": run.id}, {"$set": changes}, return_document=ReturnDocument.AFTER, session=s
        )
        if to.terminal:
            # A terminal run has no step in flight (see SQLiteStore._close_started_steps).
            closed = {"status": str(StepStatus.FAILED), "finished_at": now,
                      "error": encode(unfinished_step_error(to, error_code))}
            while await self._c("steps").find_one_and_update(
                    {"run_id": run.id, "status": str(StepStatus.STARTED)},
                    {"$set": closed}, session=s) is not None:
                pass
        head = await self._append(s, run.id, [*audit, event], now, run.audit_head)
        if doc is None:  # pragma: no cover - the run is locked by this transaction
            raise NotFound(f"run {run.id} not found")
        return _run(doc).with_head(head)

    async def request_cancel(self, run_id: str, tenant: str | None = None) -> RunRecord:
        """As SQLite, but decided under the run's lock so a concurrent claim cannot interleave."""

        async def body(s: Session) -> RunRecord:
            run = await self._lock_run(s, run_id, None)
            if tenant is not None and run.tenant != tenant:
                raise NotFound(f"run {run_id} not found")
            if run.state.terminal:
                return run
            if run.state == RunState.RUNNING:
                doc = await self._c("runs").find_one_and_update(
                    {"_id": run_id},
                    {"$set": {"cancel_requested": True}},
                    return_document=ReturnDocument.AFTER,
                    session=s,
                )
                head = await self._append(
                    s,
                    run_id,
                    [AuditEvent(kind="cancel.requested", actor="user")],
                    run.updated_at,
                    run.audit_head,
                )
                return _run(doc).with_head(head) if doc is not None else run
            return await self._transition(
                s,
                run,
                RunState.CANCELLED,
                run.updated_at,
                epoch=None,
                error_code="cancelled",
                error_message="cancelled by user",
            )

        return await self._tx(body)

    async def requeue_expired(self, now: float, *, max_attempts: int | None = None) -> list[str]:
        cursor = (
            self._c("runs")
            .find(
                {"state": str(RunState.RUNNING), "lease_expires_at": {"$lt": now}},
                projection=["_id"],
            )
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
        )
        ids = [str(d["_id"]) for d in await cursor.to_list()]
        done = []
        for run_id in ids:

            async def body(s: Session, run_id: str = run_id) -> bool:  # True: requeued
                run = await self._lock_run(s, run_id, None)
                if run.state != RunState.RUNNING or (run.lease_expires_at or 0) >= now:
                    return False  # claimed, renewed or finished since the scan
                why = f"lease of {run.lease_owner} expired"
                rec = recover_run(run, why, max_attempts)
                await self._recover(s, run, rec, now)
                return not rec.quarantined

            if await self._tx(body):
                done.append(run_id)
        return done

    # -- steps and audit -------------------------------------------------------------------------
    async def save_step(
        self,
        step: StepRecord,
        epoch: int,
        audit: Sequence[AuditEvent] = (),
        *,
        reserve: dict[str, float] | None = None,
        settle: dict[str, float] | None = None,
    ) -> None:
        """Journal a step; ``reserve`` debits the run's ledgers first (once per step, atomically
        with the journal write), ``settle`` corrects them with actual usage.

        A refused reservation writes nothing for the step and no audit; the same transaction
        marks the ledger exhausted (if it was not already) and BudgetExceeded is raised after
        the commit. ``step.reserved`` is updated only once the transaction has committed.
        """

        async def body(s: Session) -> _StepOutcome:
            run = await self._lock_run(s, step.run_id, epoch, journal=True)
            reserved = step.reserved
            if reserve:
                prior = await self._c("steps").find_one(
                    {"run_id": step.run_id, "seq": step.seq}, projection=["reserved"], session=s
                )
                if prior is not None and prior.get("reserved") is not None:
                    reserved = decode(prior["reserved"])  # reserved before a crash: not twice
                else:
                    ledgers = await self._lock_ledgers(s, run.ledgers)
                    try:
                        ledger_logic.check_reserve(ledgers, reserve)
                    except ledger_logic.BudgetExceeded as exc:
                        await self._c("ledgers").update_one(
                            {"_id": exc.ledger_id, "exhausted": None},
                            {"$set": {"exhausted": exc.resource}},
                            session=s,
                        )
                        return exc, None, None
                    await self._debit(s, ledgers, reserve)
                    reserved = dict(reserve)
            over = None
            if settle:
                ledgers = await self._lock_ledgers(s, run.ledgers)
                await self._debit(s, ledgers, settle)
                over = ledger_logic.overspent(ledgers, settle)
                if over is not None:  # the usage stays recorded; the tree stops
                    await self._c("ledgers").update_one(
                        {"_id": over.ledger_id, "exhausted": None},
                        {"$set": {"exhausted": over.resource}},
                        session=s,
                    )
            await self._write_step(s, step, reserved)
            await self._append(
                s, step.run_id, audit, step.finished_at or step.started_at, run.audit_head
            )
            return None, reserved, over

        refused, reserved, over = await self._tx(body)
        if refused is not None:
            raise refused
        step.reserved = reserved
        if over is not None:
            raise over

    async def _write_step(
        self, s: Session, step: StepRecord, reserved: dict[str, float] | None
    ) -> None:
        """Upsert ``(run_id, seq)`` with SQLite's ON CONFLICT rules: kind, name, idempotency
        key and start time are kept from the first write; ``reserved`` is never cleared."""
        changes: Doc = {
            "status": str(step.status),
            "input": encode(step.input),
            "output": encode(step.output),
            "error": encode(step.error),
            "attempts": step.attempts,
            "finished_at": step.finished_at,
        }
        first: Doc = {
            "kind": str(step.kind),
            "name": step.name,
            "idempotency_key": step.idempotency_key,
            "started_at": step.started_at,
        }
        if reserved is not None:
            changes["reserved"] = encode(reserved)
        else:
            first["reserved"] = None
        await self._c("steps").update_one(
            {"run_id": step.run_id, "seq": step.seq},
            {"$set": changes, "$setOnInsert": first},
            upsert=True,
            session=s,
        )

    async def save_steps(
        self, writes: Sequence[StepWrite], epoch: int, *, unless_cancelled: bool = False,
    ) -> Journaled:
        """One :meth:`save_step` after another (see :func:`save_in_turn`)."""
        return await save_in_turn(self, writes, epoch, unless_cancelled=unless_cancelled)

    async def get_ledger(self, ledger_id: str) -> LedgerRecord:
        doc = await self._c("ledgers").find_one({"_id": ledger_id})
        if doc is None:
            raise NotFound(f"ledger {ledger_id} not found")
        state = _ledger_state(doc)
        return LedgerRecord(
            id=state.id, limits=state.limits, used=state.used, exhausted=state.exhausted
        )

    async def list_steps(self, run_id: str) -> list[StepRecord]:
        cursor = self._c("steps").find({"run_id": run_id}).sort("seq", ASCENDING)
        return [_step(d) for d in await cursor.to_list()]

    async def append_audit(
        self, run_id: str, events: Sequence[AuditEvent], now: float, *, epoch: int | None = None
    ) -> None:
        async def body(s: Session) -> None:
            run = await self._lock_run(s, run_id, epoch, journal=True)
            await self._append(s, run_id, events, now, run.audit_head)

        await self._tx(body)

    async def list_audit(self, run_id: str, after_seq: int = 0) -> list[AuditRecord]:
        cursor = self._c("audit").find({"run_id": run_id, "seq": {"$gt": after_seq}})
        docs = await cursor.sort("seq", ASCENDING).to_list()
        return [AuditRecord.from_dict(_fields(d, None)) for d in docs]

    # -- approvals -----------------------------------------------------------------------------
    async def create_approval(
        self, approval: ApprovalRecord, epoch: int, audit: Sequence[AuditEvent] = ()
    ) -> ApprovalRecord:
        """Record a pending approval for a step; the same step never gets two (the run's lock
        serializes concurrent requests, the unique index guards it too)."""
        doc = approval.model_dump()
        doc["_id"] = doc.pop("id")
        doc["arguments"] = encode(approval.arguments)
        doc["status"] = str(approval.status)
        doc["version"] = 0

        async def body(s: Session) -> ApprovalRecord:
            run = await self._lock_run(s, approval.run_id, epoch, journal=True)
            found = await self._c("approvals").find_one(
                {"run_id": approval.run_id, "step": approval.step}, session=s
            )
            if found is not None:
                return _approval(found)
            await self._c("approvals").insert_one(dict(doc), session=s)
            await self._append(s, approval.run_id, audit, approval.created_at, run.audit_head)
            return approval

        return await self._tx(body)

    async def get_approval(self, approval_id: str, tenant: str | None = None) -> ApprovalRecord:
        doc = await self._c("approvals").find_one({"_id": approval_id})
        if doc is None or (tenant is not None and doc["tenant"] != tenant):
            raise NotFound(f"approval {approval_id} not found")
        return _approval(doc)

    async def get_step_approval(self, run_id: str, step: int) -> ApprovalRecord | None:
        doc = await self._c("approvals").find_one({"run_id": run_id, "step": step})
        return _approval(doc) if doc is not None else None

    async def list_approvals(
        self,
        *,
        tenant: str | None = None,
        status: ApprovalStatus | None = None,
        run_id: str | None = None,
        limit: int = 100,
    ) -> list[ApprovalRecord]:
        if limit == 0:
            return []
        query = {
            col: str(val)
            for col, val in (("tenant", tenant), ("status", status), ("run_id", run_id))
            if val is not None
        }
        cursor = (
            self._c("approvals").find(query).sort([("created_at", DESCENDING), ("_id", DESCENDING)])
        )
        if limit > 0:
            cursor = cursor.limit(limit)
        return [_approval(d) for d in await cursor.to_list()]

    async def _lock_approval(
        self, s: Session, approval_id: str, tenant: str | None = None
    ) -> ApprovalRecord:
        """Bump the approval's version: a concurrent decision conflicts, re-runs, and then sees
        the winner's status."""
        doc = await self._c("approvals").find_one_and_update(
            {"_id": approval_id},
            {"$inc": {"version": 1}},
            return_document=ReturnDocument.AFTER,
            session=s,
        )
        if doc is None or (tenant is not None and doc["tenant"] != tenant):
            raise NotFound(f"approval {approval_id} not found")
        return _approval(doc)

    async def decide_approval(
        self,
        approval_id: str,
        *,
        approve: bool,
        by: str,
        comment: str | None,
        now: float,
        tenant: str | None = None,
    ) -> ApprovalRecord:
        """Approve or reject a pending approval and wake its run, in one transaction."""
        status = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED

        async def body(s: Session) -> ApprovalRecord:
            approval = await self._lock_approval(s, approval_id, tenant)
            if approval.status != ApprovalStatus.PENDING:
                raise ApprovalConflict(f"approval {approval_id} is already {approval.status}")
            run = await self._lock_run(s, approval.run_id, None)
            if run.state.terminal:
                raise ApprovalConflict(closed_run_decision(approval_id, run))
            await self._c("approvals").update_one(
                {"_id": approval_id},
                {
                    "$set": {
                        "status": str(status),
                        "decided_by": by,
                        "decided_at": now,
                        "comment": comment,
                    }
                },
                session=s,
            )
            event = AuditEvent(
                kind="approval.decided",
                actor=f"user:{by}",
                data={
                    "approval_id": approval_id,
                    "step": approval.step,
                    "action": approval.action,
                    "decision": str(status),
                    "comment": comment,
                    "decided_at": iso_utc(now),
                },
            )
            await self._wake(s, run, now, [event], "approval decided")
            return approval.model_copy(
                update={"status": status, "decided_by": by, "decided_at": now, "comment": comment}
            )

        return await self._tx(body)

    async def _wake(
        self, s: Session, run: RunRecord, now: float, events: list[AuditEvent], why: str
    ) -> None:
        """Requeue a waiting run (locked by the caller for the state change and the audit
        append); a finished run's chain is closed, so a late expiry is kept on the approval."""
        if run.state.terminal:
            return
        if run.state == RunState.WAITING:
            events = [*events, _set_state(run, RunState.QUEUED, None, why)]
            await self._c("runs").update_one(
                {"_id": run.id},
                {"$set": {"state": str(RunState.QUEUED), "updated_at": now}},
                session=s,
            )
        await self._append(s, run.id, events, now, run.audit_head)

    async def expire_approvals(self, now: float) -> list[ApprovalRecord]:
        """Pending approvals past their expiry: marked expired; the run is woken to apply its
        policy (a ``deny`` fails it at its next turn)."""
        cursor = (
            self._c("approvals")
            .find(
                {"status": str(ApprovalStatus.PENDING), "expires_at": {"$ne": None, "$lt": now}},
                projection=["_id"],
            )
            .sort([("created_at", ASCENDING), ("_id", ASCENDING)])
        )
        ids = [str(d["_id"]) for d in await cursor.to_list()]
        out = []
        for approval_id in ids:

            async def body(s: Session, approval_id: str = approval_id) -> ApprovalRecord | None:
                approval = await self._lock_approval(s, approval_id)
                if approval.status != ApprovalStatus.PENDING:
                    return None  # decided (or expired by another reaper) since the scan
                await self._c("approvals").update_one(
                    {"_id": approval_id},
                    {
                        "$set": {
                            "status": str(ApprovalStatus.EXPIRED),
                            "decided_by": "system:expiry",
                            "decided_at": now,
                        }
                    },
                    session=s,
                )
                event = AuditEvent(
                    kind="approval.expired",
                    actor="system:expiry",
                    data={"approval_id": approval_id, "policy": approval.on_expiry},
                )
                run = await self._lock_run(s, approval.run_id, None)
                await self._wake(s, run, now, [event], "approval expired")
                return approval.model_copy(update={"status": ApprovalStatus.EXPIRED})

            expired = await self._tx(body)
            if expired is not None:
                out.append(expired)
        return out

    # -- API keys ------------------------------------------------------------------------------
    async def create_api_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        doc = key.model_dump()
        doc["_id"] = doc.pop("id")
        await self._c("api_keys").insert_one(doc)
        return key

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        doc = await self._c("api_keys").find_one({"key_hash": key_hash, "revoked_at": None})
        return _api_key(doc) if doc is not None else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        query = {} if tenant is None else {"tenant": tenant}
        order = [("created_at", ASCENDING), ("_id", ASCENDING)]
        cursor = self._c("api_keys").find(query).sort(order)
        return [_api_key(d) for d in await cursor.to_list()]

    # -- registered workflows ------------------------------------------------------------------
    async def put_workflow(self, workflow: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        """Read the latest version, insert the next; the unique ``(tenant, name, version)``
        index refuses a number a concurrent push took first, and the read-insert is retried."""
        key = {"tenant": workflow.tenant, "name": workflow.name}
        for _attempt in range(_PUT_ATTEMPTS):
            latest = await self._c("workflows").find_one(key, sort=[("version", DESCENDING)])
            if latest is not None and latest["content_hash"] == workflow.content_hash:
                return _workflow(latest), False
            number = int(latest["version"]) + 1 if latest is not None else 1
            stored = workflow.model_copy(update={"version": number})
            try:
                await self._c("workflows").insert_one(stored.model_dump())
            except DuplicateKeyError:
                continue  # another push took this number first: read the new latest
            return stored, True
        raise RuntimeError(f"workflow {workflow.name!r}: {_PUT_ATTEMPTS} concurrent pushes "
                           "won the version number first; push again")

    async def get_workflow(self, tenant: str, name: str,
                           version: int | None = None) -> WorkflowRecord:
        query: Doc = {"tenant": tenant, "name": name}
        if version is not None:
            query["version"] = version
        doc = await self._c("workflows").find_one(query, sort=[("version", DESCENDING)])
        if doc is None:
            raise NotFound(workflow_not_found(name, version))
        return _workflow(doc)

    async def list_workflows(self, tenant: str) -> list[WorkflowRecord]:
        cursor = self._c("workflows").find({"tenant": tenant}).sort(
            [("name", ASCENDING), ("version", DESCENDING)])
        latest: dict[str, WorkflowRecord] = {}
        for doc in await cursor.to_list():
            latest.setdefault(str(doc["name"]), _workflow(doc))
        return list(latest.values())

    async def list_workflow_versions(self, tenant: str, name: str) -> list[WorkflowRecord]:
        cursor = self._c("workflows").find({"tenant": tenant, "name": name}).sort(
            "version", DESCENDING)
        return [_workflow(d) for d in await cursor.to_list()]

    # -- threads ---------------------------------------------------------------------------------
    async def _lock_thread(self, s: Session, thread_id: str, tenant: str | None) -> ThreadRecord:
        """Bump the thread's version: concurrent turns, forks and deletions of one thread
        conflict and re-run (the counterpart of PostgreSQL's ``FOR UPDATE``)."""
        doc = await self._c("threads").find_one_and_update(
            {"_id": thread_id}, {"$inc": {"version": 1}},
            return_document=ReturnDocument.AFTER, session=s)
        if doc is None or (tenant is not None and doc["tenant"] != tenant) or (
                doc.get("deleted_at") is not None):
            raise NotFound(thread_not_found(thread_id))
        return _thread(doc)

    async def _thread_audit(self, s: Session, thread_id: str, events: Sequence[AuditEvent],
                            now: float) -> None:
        """Append to the thread's chain; callers hold the thread's lock (or just inserted it)."""
        if not events:
            return
        head = await self._c("thread_audit").find_one(
            {"run_id": thread_id}, projection=["seq", "hash"], sort=[("seq", DESCENDING)],
            session=s)
        chain = AuditChain(thread_id, self.audit_key,
                           *((int(head["seq"]), str(head["hash"])) if head else (0, GENESIS)))
        await self._c("thread_audit").insert_many(_chained(chain, events, now), session=s)

    async def _insert_thread(self, s: Session, thread: ThreadRecord,
                             audit: Sequence[AuditEvent], ledger: LedgerRecord | None) -> None:
        await self._c("threads").insert_one(_thread_doc(thread), session=s)
        if ledger is not None:
            await self._insert_ledger(s, ledger, thread.created_at)
        await self._thread_audit(s, thread.id, audit, thread.created_at)

    async def create_thread(
        self, thread: ThreadRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> ThreadRecord:
        async def body(s: Session) -> ThreadRecord:
            await self._insert_thread(s, thread, audit, ledger)
            return thread

        return await self._tx(body)

    async def get_thread(self, thread_id: str, tenant: str | None = None, *,
                         deleted: bool = False) -> ThreadRecord:
        doc = await self._c("threads").find_one({"_id": thread_id})
        if doc is None or (tenant is not None and doc["tenant"] != tenant) or (
                doc.get("deleted_at") is not None and not deleted):
            raise NotFound(thread_not_found(thread_id))
        return _thread(doc)

    async def list_threads(self, *, tenant: str | None = None,
                           limit: int = 100) -> list[ThreadRecord]:
        if limit == 0:
            return []
        query: Doc = {"deleted_at": None}
        if tenant is not None:
            query["tenant"] = tenant
        cursor = self._c("threads").find(query).sort(
            [("updated_at", DESCENDING), ("_id", DESCENDING)])
        if limit > 0:
            cursor = cursor.limit(limit)
        return [_thread(d) for d in await cursor.to_list()]

    async def _turns(self, s: Session | None, thread_id: str) -> list[RunRecord]:
        cursor = self._c("runs").find({"thread_id": thread_id}, session=s).sort(
            "turn", ASCENDING)
        return [_run(d) for d in await cursor.to_list()]

    async def create_turn(
        self, run: RunRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        thread_id = run.thread_id or ""

        async def body(s: Session) -> tuple[RunRecord, bool]:
            found = await self._idempotent(s, run)
            if found is not None:
                return found, False
            await self._lock_thread(s, thread_id, run.tenant)
            last = await self._c("runs").find_one(
                {"thread_id": thread_id}, sort=[("turn", DESCENDING)], session=s)
            numbered = run.model_copy(update={"turn": next_turn(
                thread_id, _run(last) if last is not None else None)})
            created = await self._insert_run(s, numbered, audit, ledger)
            await self._c("threads").update_one(
                {"_id": thread_id}, {"$set": {"updated_at": run.created_at}}, session=s)
            await self._thread_audit(s, thread_id, [turn_created(created)], run.created_at)
            return created, True

        return await self._create(body, run)

    async def list_turns(self, thread_id: str) -> list[RunRecord]:
        return await self._turns(None, thread_id)

    async def fork_thread(self, thread: ThreadRecord, copies: Sequence[TurnCopy],
                          audit: Sequence[AuditEvent] = (),
                          ledger: LedgerRecord | None = None) -> ThreadRecord:
        async def body(s: Session) -> ThreadRecord:
            if thread.forked_from is not None:  # locked: conflicts with a concurrent delete
                await self._lock_thread(s, thread.forked_from, thread.tenant)
            await self._insert_thread(s, thread, audit, ledger)
            for copy in copies:
                await self._insert_run(s, copy.run, copy.audit, None)
                for step in copy.steps:
                    await self._write_step(s, step, step.reserved)
            return thread

        return await self._tx(body)

    async def delete_thread(self, thread_id: str, now: float, *, tenant: str | None = None,
                            actor: str = "user") -> ThreadRecord:
        async def body(s: Session) -> ThreadRecord:
            thread = await self._lock_thread(s, thread_id, tenant)
            turns = await self._turns(s, thread_id)
            check_deletable(thread_id, turns)
            erased = []
            for turn in turns:
                tree = await self._c("runs").find({"root_id": turn.id}, session=s).sort(
                    [("created_at", ASCENDING), ("_id", ASCENDING)]).to_list()
                erased += [Erased(str(d["_id"]), turn.turn if d["_id"] == turn.id else None,
                                  int(d["audit_seq"]), str(d["audit_hash"])) for d in tree]
            for e in erased:
                await self._c("audit").delete_many({"run_id": e.run_id}, session=s)
                await self._c("steps").delete_many({"run_id": e.run_id}, session=s)
                await self._c("approvals").update_many(
                    {"run_id": e.run_id}, {"$set": {"arguments": {}, "comment": None}},
                    session=s)
                await self._c("runs").update_one(
                    {"_id": e.run_id},
                    {"$set": {"input": ERASED, "output": None, "error_message": None}},
                    session=s)
            await self._c("threads").update_one({"_id": thread_id}, {"$set": {
                "title": ERASED, "metadata": {}, "deleted_at": now, "updated_at": now}},
                session=s)
            await self._thread_audit(s, thread_id, [thread_deleted(erased, actor)], now)
            return thread.model_copy(update={"title": ERASED, "metadata": {},
                                             "deleted_at": now, "updated_at": now})

        return await self._tx(body)

    async def list_thread_audit(self, thread_id: str, after_seq: int = 0) -> list[AuditRecord]:
        cursor = self._c("thread_audit").find({"run_id": thread_id, "seq": {"$gt": after_seq}})
        docs = await cursor.sort("seq", ASCENDING).to_list()
        return [AuditRecord.from_dict(_fields(d, None)) for d in docs]

"""The server store: PostgreSQL through psycopg 3 (async pool), safe for many workers and hosts.

Same semantics as :mod:`.sqlite`, with row locks instead of SQLite's file lock: every fenced
write holds the run row's lock in the transaction that does the write, so the epoch check,
the write and the audit append (after the head on that row) are atomic across processes;
``claim_next`` uses ``FOR UPDATE SKIP LOCKED`` so concurrent workers never wait on, or
double-claim, the same run.

Journal writes are one statement, ``alpaca_journal_steps`` (migration 8): a step's outcome
and the next step's start together (:meth:`PostgresStore.save_steps`). The lease owner is the
only writer of its run's steps, so the store computes the audit records and ledger debits
from what it wrote last (:class:`_Known`) and the function checks those values under the row
locks before writing; when another actor moved them, nothing is written and the locked
transaction of :meth:`PostgresStore._save_step_locked` does it. Claims and transitions are
two round trips (:meth:`PostgresStore._two_trips`); a run's end or pause makes its last
journal writes in the first of them. See bench/README.md for the numbers.

Budget reservations lock the run row and then every ledger row of the run ``FOR UPDATE`` in
ledger-id order, so any number of workers reserving on a shared ledger serialize on it (no
overspend) and never deadlock; deciding or expiring an approval locks the approval row, then
the run row, so exactly one decision wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import select
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, AsyncCursor, errors, sql
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Json, Jsonb
from psycopg_pool import AsyncConnectionPool

from .. import budget as ledger_logic
from ..errors import ApprovalConflict, LeaseLost, NotFound
from ..faults import DEFAULT_CONNECT_TIMEOUT, translating_faults
from ..lifecycle import RunState, check_transition
from ..telemetry.audit import GENESIS, AuditChain, AuditRecord, iso_utc
from . import observers
from .base import Journaled, RunFlags, StepWrite, save_in_turn
from .ownership import ClaimPlan, Recovery, closed_run_decision, plan_claim
from .ownership import recover as recover_run
from .postgres_migrations import POSTGRES as MIGRATIONS
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

_JSON_RUN_FIELDS = ("ancestry", "budget", "usage", "ledgers")

_PUT_ATTEMPTS = 50
"""Retries of a workflow push that lost the race for its version number to another push."""

Cursor = AsyncCursor[DictRow]
Pool = AsyncConnectionPool[AsyncConnection[DictRow]]

_TERMINAL = [str(s) for s in RunState if s.terminal]

_JOURNAL_STEPS = (
    "SELECT alpaca_journal_steps(%s::jsonb, %s::boolean, ARRAY["
    + ", ".join(f"'{state}'" for state in _TERMINAL) + "]::text[]) AS r")
"""Journal writes in one statement (migration 8: for each, fence, head and ledger checks,
debit, step, audit, as migration 7's ``alpaca_journal_step``), all in one JSON parameter."""

_STALE_LEDGER = "AL001"
"""What ``alpaca_journal_steps`` raises (rolling its writes back) when a ledger moved."""

_KNOWN_RUNS = 10_000
"""How many leased runs' last writes a store remembers (an evicted run takes the locked path
once)."""


class _Writer(Protocol):
    """Where a transaction's writes go: a cursor runs each at once, a :class:`_Batch` sends
    them all with the COMMIT."""

    async def execute(self, query: Any, params: Any = None) -> object: ...


def _results(row: DictRow | None) -> list[list[str]]:
    """What ``alpaca_journal_steps`` answered, a write each: its status (``ok``, or why it
    was not made: ``missing``, ``lease_lost``, ``closed``, ``stale_head``; ``skipped`` for a
    last write held back by a cancel request), then the run's epoch and cancel flag as the
    write saw them. No row reads as a missing run."""
    return [part.split(",") for part in str(row["r"] if row else "missing").split("|")]


class _Batch:
    """The writes of a :meth:`PostgresStore._two_trips` transaction, bound client-side and
    sent with its COMMIT as one simple query: the second (and last) round trip."""

    def __init__(self, led: list[DictRow] | None = None) -> None:
        self.queries: list[str] = []
        self.params: list[Any] = []
        self.led = led or []
        """The rows of the transaction's lead statement (:meth:`PostgresStore._two_trips`)."""

    async def execute(self, query: Any, params: Any = None) -> object:
        self.queries.append(str(query))
        self.params.extend(params or ())
        return None


_LOCK_RUN = "SELECT * FROM runs WHERE id=%s FOR UPDATE"

_NEXT_QUEUED = (
    "SELECT * FROM runs WHERE state=%s ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
)

_WITH_LEDGERS = (
    "SELECT r.*, (SELECT COALESCE(jsonb_agg(to_jsonb(l)), '[]') FROM ledgers l "
    "WHERE l.id IN (SELECT jsonb_array_elements_text(r.ledgers))) AS ledger_rows "
    "FROM ({}) r"
)
"""A claim's locking read with the run's ledger rows (what its first journal write assumes)."""


@dataclass(frozen=True)
class _Known:
    """What this store last wrote for a run under lease ``epoch``: the chain head it left and
    the ledger values it saw (``None``: not read yet). Only a hint for the one-statement
    write, which checks every part of it under the row locks: only the lease owner writes
    steps, so a match is the common case; another actor's append (an approval decided, a
    cancel requested) or a sibling's debit on a shared ledger makes it miss, never wrong."""

    epoch: int
    head: tuple[int, str]
    ledgers: tuple[ledger_logic.LedgerState, ...] | None = None


@dataclass(frozen=True)
class _Planned:
    """A journal write worked out for the one-statement path: its parameters, what it
    reserves, the store's knowledge after it, and the overspend it causes (if any)."""

    write: StepWrite
    payload: dict[str, Any]
    reserved: dict[str, float] | None
    after: _Known
    over: ledger_logic.BudgetExceeded | None


class _StaleLedger(Exception):
    """A batched journal write found a ledger moved by a sibling: nothing was written."""


def _lock_key(schema: str) -> int:
    """A stable 64-bit advisory-lock key per schema: migrations of different schemas don't wait
    on each other, concurrent openers of one schema do."""
    digest = hashlib.sha256(f"alpaca_engine.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _quiet_pool_log() -> None:
    """The pool logs a warning per failed reconnect attempt (several a second in an outage);
    the engine reports an outage once (worker log, 503, the CLI's one line), so keep only
    the pool's errors, unless the user configured that logger."""
    pool_log = logging.getLogger("psycopg.pool")
    if pool_log.level == logging.NOTSET:
        pool_log.setLevel(logging.ERROR)


def _hung_up(conn: AsyncConnection[DictRow]) -> bool:
    """Whether an idle pooled connection is unusable, without a round trip to the server.

    An idle connection has nothing to read: a readable socket means the server hung up (a
    terminated backend sends its FATAL error and closes) or, rarely, sent a notice; either way
    the connection is replaced, which costs a connect instead of a failed write."""
    if conn.closed or conn.broken:
        return True
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - no poll(): Windows
    return bool(readable)


def _jsonb(value: Any) -> Jsonb | None:
    """SQL NULL for None (as SQLite stores it), JSONB otherwise."""
    return None if value is None else Jsonb(value)


@translating_faults
class PostgresStore:
    """The :class:`~.base.Store` on PostgreSQL; ``schema`` isolates tenants of one database
    (tests use a fresh one each), ``pool_size`` caps this process's connections,
    ``connect_timeout`` bounds opening and every wait for a pooled connection."""

    migrations_applied: tuple[int, ...] = ()
    """What the last :meth:`open` applied (``alpaca db upgrade`` reports it)."""

    def __init__(
        self,
        url: str,
        audit_key: bytes | None = None,
        *,
        schema: str | None = None,
        pool_size: int = 10,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.url = url
        self.audit_key = audit_key
        self.schema = schema
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._pool: Pool | None = None
        self._known: OrderedDict[str, _Known] = OrderedDict()

    def _note(
        self, run_id: str, epoch: int, head: tuple[int, str],
        ledgers: tuple[ledger_logic.LedgerState, ...] | None = None,
    ) -> None:
        """Remember what this store just wrote for a leased run (see :class:`_Known`)."""
        self._known[run_id] = _Known(epoch, head, ledgers)
        self._known.move_to_end(run_id)
        if len(self._known) > _KNOWN_RUNS:
            self._known.popitem(last=False)

    def _note_head(self, run_id: str, epoch: int | None, head: tuple[int, str]) -> None:
        """After a fenced append by the lease owner: the new head, the same ledger values."""
        known = self._known.get(run_id)
        if epoch is not None and known is not None and known.epoch == epoch:
            self._note(run_id, epoch, head, known.ledgers)

    def _forget(self, run_id: str) -> None:
        self._known.pop(run_id, None)

    # -- connection and schema -------------------------------------------------------------
    async def _configure(self, conn: AsyncConnection[DictRow]) -> None:
        """Point every pooled connection at the store's schema (autocommit: no open txn)."""
        if self.schema is not None:
            await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))

    async def _probe(self) -> None:
        """One direct connection before the pool starts: the real cause (refused, no such
        database, bad password) within the timeout, instead of a pool retrying in the
        background until its own timeout with the cause only in log lines. A TimeoutError
        becomes a ``timeout`` fault (see :func:`~alpaca_engine.faults.store_fault`)."""
        conn = await asyncio.wait_for(
            AsyncConnection.connect(self.url, connect_timeout=self._libpq_timeout),
            self.connect_timeout)
        await conn.close()

    @property
    def _libpq_timeout(self) -> int:
        """libpq's own bound for each new connection (whole seconds, at least 2)."""
        return max(2, math.ceil(self.connect_timeout))

    async def open(self) -> None:
        if self._pool is not None:
            return
        _quiet_pool_log()
        await self._probe()
        pool: Pool = AsyncConnectionPool(
            self.url,
            connection_class=AsyncConnection[DictRow],
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "connect_timeout": self._libpq_timeout},
            min_size=1,
            max_size=max(1, self.pool_size),
            configure=self._configure,
            timeout=self.connect_timeout,
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        try:
            self.migrations_applied = tuple(await self.upgrade())
        except BaseException:
            await self.close()
            raise

    async def schema_version(self) -> int:
        async with self._read() as cur:
            await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
            row = await cur.fetchone()
            if row is None or not row["present"]:
                return 0
            await cur.execute("SELECT MAX(version) AS v FROM schema_migrations")
            row = await cur.fetchone()
            return int(row["v"] or 0) if row else 0

    async def upgrade(self) -> list[int]:
        """Apply pending migrations in order under an advisory lock; return the versions applied.

        The lock is transaction-scoped, so concurrent openers queue behind the first and then
        see its committed ``schema_migrations`` rows (READ COMMITTED re-reads per statement).
        """
        applied: list[int] = []
        async with self._tx() as cur:
            target = self.schema
            if target is None:
                await cur.execute("SELECT current_schema() AS s")
                row = await cur.fetchone()
                target = (row["s"] if row else None) or ""
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(target),))
            if self.schema is not None:
                await cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,))
                if await cur.fetchone() is None:
                    await cur.execute(
                        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema))
                    )
            await cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)"
            )
            await cur.execute("SELECT MAX(version) AS v FROM schema_migrations")
            row = await cur.fetchone()
            current = int(row["v"] or 0) if row else 0
            for version, script in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                await cur.execute(script)
                await cur.execute("INSERT INTO schema_migrations(version) VALUES (%s)", (version,))
                applied.append(version)
        return applied

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def _conns(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[DictRow]]:
        """A pooled connection the server has not hung up on (see :func:`_hung_up`).

        No query checks it on checkout (that was a round trip per use); one found dead is
        closed, so the pool replaces it, and the next is tried at once. A connection that
        breaks while in use fails that call and is replaced when it is returned."""
        pool = self._conns
        for _attempt in range(pool.max_size):
            conn = await pool.getconn()
            if not _hung_up(conn):
                break
            await conn.close()
            await pool.putconn(conn)
        else:
            conn = await pool.getconn()
        try:
            async with conn:
                yield conn
        finally:
            await pool.putconn(conn)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Cursor]:
        """One transaction on one pooled connection; rolled back on any exception."""
        with observers.transaction():
            async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Cursor]:
        """A cursor for plain reads (autocommit: each statement sees the latest commits)."""
        async with self._connection() as conn, conn.cursor() as cur:
            yield cur

    @asynccontextmanager
    async def _two_trips(
        self, query: str, params: Sequence[Any], *, lead: str | None = None,
        lead_params: Sequence[Any] = (),
    ) -> AsyncIterator[tuple[list[DictRow], _Batch]]:
        """A transaction in two round trips: ``BEGIN`` with its locking read ``query`` (after
        ``lead``, a statement whose rows are the batch's ``led``), then the writes the caller
        queued on the batch with ``COMMIT`` (each one simple query, parameters bound
        client-side). An exception rolls it back, as :meth:`_tx` does; what it appended to
        audit chains reaches the observers only after the COMMIT."""
        with observers.transaction():
            async with self._connection() as conn:
                cur = AsyncClientCursor(conn, row_factory=dict_row)
                try:
                    if lead is None:
                        await cur.execute("BEGIN; " + query, params)
                        cur.nextset()
                        batch = _Batch()
                    else:
                        await cur.execute(f"BEGIN; {lead}; {query}", [*lead_params, *params])
                        cur.nextset()
                        batch = _Batch(await cur.fetchall())
                        cur.nextset()
                    yield await cur.fetchall(), batch
                    await cur.execute("; ".join([*batch.queries, "COMMIT"]), batch.params)
                except BaseException:
                    if conn.pgconn.transaction_status in (
                            TransactionStatus.INTRANS, TransactionStatus.INERROR):
                        with contextlib.suppress(Exception):
                            await conn.execute("ROLLBACK")
                    raise

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _run(row: DictRow) -> RunRecord:
        return RunRecord.model_validate(row)

    @staticmethod
    def _step(row: DictRow) -> StepRecord:
        return StepRecord.model_validate(row)

    async def _fetch_run(self, cur: Cursor, run_id: str, *, lock: bool = False) -> RunRecord:
        query = (
            "SELECT * FROM runs WHERE id=%s FOR UPDATE"
            if lock
            else "SELECT * FROM runs WHERE id=%s"
        )
        await cur.execute(query, (run_id,))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        return self._run(row)

    async def _fence(
        self, cur: Cursor, run_id: str, epoch: int | None, *, journal: bool = False
    ) -> RunRecord:
        """Lock the run row for the rest of the transaction, then check the epoch: a claim or
        steal by another worker either commits before (we see its epoch) or waits for us.
        ``journal`` writes (steps, approvals, audit) also refuse a finished run, whose chain
        ends with its terminal record (DESIGN §7)."""
        return self._fenced(await self._fetch_run(cur, run_id, lock=True), epoch, journal)

    def _fenced(self, run: RunRecord, epoch: int | None, journal: bool = False) -> RunRecord:
        """The fence's check of a run row read under its lock."""
        if epoch is not None and run.epoch != epoch:
            self._forget(run.id)
            raise LeaseLost(run.id, epoch)
        if journal and run.state.terminal:
            self._forget(run.id)
            raise LeaseLost(run.id, -1 if epoch is None else epoch)
        return run

    def _records(
        self, run_id: str, events: Sequence[AuditEvent], now: float, head: tuple[int, str]
    ) -> list[AuditRecord]:
        """The records that append ``events`` to the chain after ``head`` (hashed here)."""
        chain = AuditChain(run_id, self.audit_key, *head)
        stamp = iso_utc(now)
        return [chain.append(ev.kind, ev.data, ev.actor, stamp) for ev in events]

    async def _audit(
        self,
        cur: _Writer,
        run_id: str,
        events: Sequence[AuditEvent],
        now: float,
        head: tuple[int, str],
    ) -> tuple[int, str]:
        """Append to the run's chain after ``head`` and move the head on the run row, in one
        statement; returns the new head. Callers hold the run row lock (or just inserted the
        run) and read ``head`` from it, so the chain cannot fork."""
        if not events:
            return head
        observers.written(run_id, events)
        records = self._records(run_id, events, now, head)
        params: list[Any] = []
        for rec in records:
            params += [rec.run_id, rec.seq, rec.time, rec.actor, rec.kind, Json(rec.data),
                       rec.prev_hash, rec.hash]
        values = ", ".join(["(%s,%s,%s,%s,%s,%s,%s,%s)"] * len(events))
        last = records[-1]
        await cur.execute(
            "WITH appended AS (INSERT INTO audit(run_id, seq, time, actor, kind, data, "
            f"prev_hash, hash) VALUES {values}) "
            "UPDATE runs SET audit_seq=%s, audit_hash=%s WHERE id=%s",
            (*params, last.seq, last.hash, run_id),
        )
        return last.seq, last.hash

    async def _recover(self, cur: _Writer, run: RunRecord, rec: Recovery, now: float) -> None:
        """Write a crash recovery: requeued (lease cleared, epoch bumped) or quarantined."""
        await cur.execute(
            "UPDATE runs SET state=%s, lease_owner=NULL, lease_expires_at=NULL, "
            "epoch=epoch+1, crash_count=%s, error_code=COALESCE(%s, error_code), "
            "error_message=COALESCE(%s, error_message), updated_at=%s WHERE id=%s",
            (str(rec.state), rec.crash_count, rec.error_code, rec.error_message, now, run.id),
        )
        await self._audit(cur, run.id, rec.events, now, run.audit_head)

    @staticmethod
    def _set_state(
        run: RunRecord, to: RunState, error_code: str | None, reason: str, actor: str = "engine"
    ) -> AuditEvent:
        check_transition(run.id, run.state, to, error_code)
        return AuditEvent(
            kind="state.changed",
            actor=actor,
            data={"from": str(run.state), "to": str(to), "reason": reason},
        )

    # -- runs ----------------------------------------------------------------------------------
    async def create_run(
        self,
        run: RunRecord,
        audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        """One statement (see :meth:`_insert_run`), autocommitted; with the tenant's
        idempotency key already used, the run it names and ``False``."""
        with observers.transaction():
            async with self._read() as cur:
                created = await self._insert_run(cur, run, audit, ledger)
                if created is not None:
                    return created, True
                return await self._idempotent(cur, run), False

    async def _insert_run(self, cur: Cursor, run: RunRecord, audit: Sequence[AuditEvent],
                          ledger: LedgerRecord | None) -> RunRecord | None:
        """Insert a new run, its ledger and the start of its chain in one statement: the
        run row (already carrying the head of its first records), the ledger and the audit
        records are inserted only when the run is (data-modifying CTEs on the insert's
        RETURNING), so an idempotency-key conflict inserts nothing and answers ``None``.
        Callers inside a transaction (a thread's turn) get it atomic with their other writes."""
        records = self._records(run.id, audit, run.created_at, (0, GENESIS))
        run = run.with_head((records[-1].seq, records[-1].hash) if records else (0, GENESIS))
        data = run.model_dump()
        for f in _JSON_RUN_FIELDS:
            data[f] = Jsonb(data[f])
        data["state"] = str(run.state)
        # Stored sorted, as SQLite does (a set of names; NULL = the agent's own).
        data["capabilities"] = _jsonb(
            sorted(run.capabilities) if run.capabilities is not None else None
        )
        parts: list[sql.Composable] = [sql.SQL(
            "WITH created AS (INSERT INTO runs ({cols}) VALUES ({vals}) "
            "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL "
            "DO NOTHING RETURNING id)"
        ).format(
            cols=sql.SQL(", ").join(map(sql.Identifier, data)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(data)),
        )]
        params: list[Any] = list(data.values())
        if ledger is not None:  # only with a run this call created
            parts.append(sql.SQL(
                ", ledger AS (INSERT INTO ledgers(id, limits, used, exhausted, updated_at) "
                "SELECT %s, %s, %s, %s, %s FROM created)"))
            params += [ledger.id, Jsonb(ledger.limits), Jsonb(ledger.used), ledger.exhausted,
                       run.created_at]
        if records:
            values = ", ".join(["(%s, %s::bigint, %s, %s, %s, %s::json, %s, %s)"] * len(records))
            parts.append(sql.SQL(
                ", appended AS (INSERT INTO audit(run_id, seq, time, actor, kind, data, "
                f"prev_hash, hash) SELECT v.* FROM (VALUES {values}) AS v, created)"))
            for rec in records:
                params += [rec.run_id, rec.seq, rec.time, rec.actor, rec.kind,
                           json.dumps(rec.data), rec.prev_hash, rec.hash]
        parts.append(sql.SQL(" SELECT id FROM created"))
        await cur.execute(sql.Composed(parts), params)
        if await cur.fetchone() is None:
            return None
        observers.written(run.id, audit)
        return run

    async def _idempotent(self, cur: Cursor, run: RunRecord) -> RunRecord:
        """The run the tenant's idempotency key of ``run`` already names."""
        await cur.execute(
            "SELECT * FROM runs WHERE tenant=%s AND idempotency_key=%s",
            (run.tenant, run.idempotency_key),
        )
        row = await cur.fetchone()
        if row is None:  # pragma: no cover - the conflicting row is committed
            raise NotFound(f"run with idempotency key {run.idempotency_key} vanished")
        return self._run(row)

    @staticmethod
    async def _insert_ledger(cur: Cursor, ledger: LedgerRecord, now: float) -> None:
        await cur.execute(
            "INSERT INTO ledgers(id, limits, used, exhausted, updated_at) "
            "VALUES (%s,%s,%s,%s,%s)",
            (ledger.id, Jsonb(ledger.limits), Jsonb(ledger.used), ledger.exhausted, now),
        )

    async def get_run(self, run_id: str, tenant: str | None = None) -> RunRecord:
        async with self._read() as cur:
            run = await self._fetch_run(cur, run_id)
        if tenant is not None and run.tenant != tenant:
            raise NotFound(f"run {run_id} not found")
        return run

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        state: RunState | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        rows = await self._newest("runs", {"tenant": tenant, "state": state,
                                           "root_id": root_id, "parent_id": parent_id}, limit)
        return [self._run(r) for r in rows]

    async def _newest(
        self, table: str, filters: dict[str, object], limit: int
    ) -> list[DictRow]:
        """Rows of ``table`` matching the non-None filters, newest first."""
        where = [sql.SQL("{}=%s").format(sql.Identifier(col))
                 for col, val in filters.items() if val is not None]
        args = [str(val) for val in filters.values() if val is not None]
        query: sql.Composable = sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))
        if where:
            query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
        query += sql.SQL(" ORDER BY created_at DESC, id DESC LIMIT %s")
        async with self._read() as cur:
            # A negative limit means "no limit", as in SQLite (LIMIT NULL in PostgreSQL).
            await cur.execute(query, (*args, None if limit < 0 else limit))
            return await cur.fetchall()

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
        async with self._two_trips(_WITH_LEDGERS.format(_LOCK_RUN), (run_id,)) as (rows, tx):
            if not rows:
                raise NotFound(f"run {run_id} not found")
            ledger_rows = rows[0].pop("ledger_rows")
            run = self._run(rows[0])
            plan = plan_claim(
                run, owner, now, steal=steal, expected_epoch=expected_epoch,
                max_attempts=max_attempts,
            )
            return await self._claim(tx, run, ledger_rows, plan, owner, lease_seconds, now)

    async def _claim(
        self,
        tx: _Writer,
        run: RunRecord,
        ledger_rows: list[dict[str, Any]],
        plan: ClaimPlan | None,
        owner: str,
        lease_seconds: float,
        now: float,
    ) -> RunRecord | None:
        """Lease a run whose row this transaction has locked, as ``plan`` says."""
        if plan is None:
            return None
        if plan.quarantine is not None:
            await self._recover(tx, run, plan.quarantine, now)
            return None
        leased = run.model_copy(update={
            "state": RunState.RUNNING, "lease_owner": owner,
            "lease_expires_at": now + lease_seconds, "epoch": run.epoch + 1,
            "updated_at": now, "crash_count": plan.crash_count})
        await tx.execute(
            "UPDATE runs SET state=%s, lease_owner=%s, lease_expires_at=%s, epoch=%s, "
            "updated_at=%s, crash_count=%s WHERE id=%s",
            (str(leased.state), owner, leased.lease_expires_at, leased.epoch, now,
             plan.crash_count, run.id),
        )
        head = await self._audit(tx, run.id, plan.events, now, run.audit_head)
        # What the new owner's first journal write will assume (see _Known).
        states = {str(r["id"]): self._ledger_state(r) for r in ledger_rows}
        self._note(run.id, leased.epoch, head,
                   tuple(states[lid] for lid in run.ledgers if lid in states))
        return leased.with_head(head)

    async def claim_next(self, owner: str, lease_seconds: float, now: float) -> RunRecord | None:
        query = _WITH_LEDGERS.format(_NEXT_QUEUED)
        async with self._two_trips(query, (str(RunState.QUEUED),)) as (rows, tx):
            if not rows:
                return None
            ledger_rows = rows[0].pop("ledger_rows")
            run = self._run(rows[0])
            plan = plan_claim(run, owner, now)
            return await self._claim(tx, run, ledger_rows, plan, owner, lease_seconds, now)

    async def renew_lease(
        self, run_id: str, owner: str, epoch: int, lease_seconds: float, now: float
    ) -> None:
        async with self._tx() as cur:
            run = await self._fence(cur, run_id, epoch)
            if run.state != RunState.RUNNING or run.lease_owner != owner:
                raise LeaseLost(run_id, epoch)
            await cur.execute(
                "UPDATE runs SET lease_expires_at=%s WHERE id=%s", (now + lease_seconds, run_id)
            )

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
        """Two round trips. With ``steps`` this store planned (see :meth:`save_steps`), the
        first also makes them (``alpaca_journal_steps``, in this transaction); otherwise, or
        when one of them could not be made so, they are written by :meth:`save_steps` first
        (their own commit) and the move follows in its own."""
        if steps and epoch is None:
            raise ValueError("journal writes need the lease's epoch")

        async def move(tx: _Writer, row: DictRow) -> RunRecord:
            return await self._transition(
                tx, self._fenced(self._run(row), epoch), to, now, epoch=epoch, output=output,
                error_code=error_code, error_message=error_message, usage=usage, audit=audit,
                output_type=output_type)

        done: RunRecord | None = None
        if steps:
            assert epoch is not None
            plans = self._plans(steps, epoch)
            done, written = await self._journal_and_move(plans, run_id, move) if plans else (
                None, 0)
            if done is None:
                await self.save_steps(steps[written:], epoch)
        if done is None:
            async with self._two_trips(_LOCK_RUN, (run_id,)) as (rows, tx):
                if not rows:
                    raise NotFound(f"run {run_id} not found")
                done = await move(tx, rows[0])
        if done.state == RunState.RUNNING:
            self._note_head(run_id, epoch, done.audit_head)
        else:
            self._forget(run_id)  # the lease ends: the next owner starts afresh
        return done

    def _plans(self, writes: Sequence[StepWrite], epoch: int) -> list[_Planned]:
        """The one-statement plans of ``writes`` when this store wrote the run's last entry
        and every write can be made so (empty otherwise): each after the one before, each
        moving the chain head (when there are several), none overspending."""
        known = self._known.get(writes[0].step.run_id)
        if known is None or known.epoch != epoch:
            return []
        plans: list[_Planned] = []
        for write in writes:
            plan = self._plan_fast(write, epoch, known)
            # With several, every write must move the chain head, so a write that fails its
            # check stops the ones after it (theirs no longer match); an overspend stops the
            # tree.
            if plan is None or plan.over is not None or (len(writes) > 1 and not write.audit):
                return []
            plans.append(plan)
            known = plan.after
        return plans

    async def _journal_and_move(
        self, plans: list[_Planned], run_id: str,
        move: Callable[[_Writer, DictRow], Awaitable[RunRecord]],
    ) -> tuple[RunRecord | None, int]:
        """The planned writes and then ``move`` (on the run row, locked after them) in one
        transaction: the moved run and how many writes were made. ``None``: the move was not
        made; the writes made before the first that could not be (a stale head) are
        committed, and none when a ledger moved (the statement is rolled back)."""
        payload = json.dumps([plan.payload for plan in plans])
        try:
            async with self._two_trips(_LOCK_RUN, (run_id,), lead=_JOURNAL_STEPS,
                                       lead_params=(payload, False)) as (rows, tx):
                statuses = [result[0] for result in _results(tx.led[0] if tx.led else None)]
                written = 0
                for plan, status in zip(plans, statuses, strict=False):
                    self._written(plan, status)
                    if status != "ok":
                        break
                    observers.written(run_id, plan.write.audit)
                    written += 1
                if written < len(plans) or not rows:
                    return None, written
                return await move(tx, rows[0]), written
        except psycopg.Error as exc:
            if exc.sqlstate != _STALE_LEDGER:
                raise
            return None, 0  # a sibling's debit since this store's: nothing written

    async def _transition(
        self,
        cur: _Writer,
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
        """The body of :meth:`transition` for a run row already fenced in this transaction."""
        if epoch is None and run.state == RunState.RUNNING and to != RunState.QUEUED:
            raise LeaseLost(run.id, -1)
        reason = error_message or ("finished" if to.terminal else str(to))
        event = self._set_state(run, to, error_code, reason)
        event.data.update({"error_code": error_code} if error_code else {})
        keep_lease = to == RunState.RUNNING
        epoch_after = run.epoch if keep_lease or epoch is not None else run.epoch + 1
        # The row as this UPDATE leaves it (no RETURNING: the writes go in one batch).
        moved = run.model_copy(update={
            "state": to, "output": run.output if output is None else output,
            "output_type": run.output_type if output_type is None else output_type,
            "error_code": error_code, "error_message": error_message,
            "usage": run.usage if usage is None else usage, "updated_at": float(now),
            "epoch": epoch_after, "lease_owner": run.lease_owner if keep_lease else None,
            "lease_expires_at": run.lease_expires_at if keep_lease else None})
        await cur.execute(
            "UPDATE runs SET state=%s, output=COALESCE(%s, output), "
            "output_type=COALESCE(%s, output_type), error_code=%s, "
            "error_message=%s, usage=COALESCE(%s, usage), updated_at=%s, epoch=%s, "
            "lease_owner=CASE WHEN %s THEN lease_owner END, "
            "lease_expires_at=CASE WHEN %s THEN lease_expires_at END WHERE id=%s",
            (
                str(to),
                output,
                output_type,
                error_code,
                error_message,
                _jsonb(usage),
                now,
                epoch_after,
                keep_lease,
                keep_lease,
                run.id,
            ),
        )
        if to.terminal:
            # A terminal run has no step in flight (see SQLiteStore._close_started_steps).
            await cur.execute(
                "UPDATE steps SET status=%s, error=COALESCE(error, %s), finished_at=%s "
                "WHERE run_id=%s AND status=%s",
                (str(StepStatus.FAILED), Jsonb(unfinished_step_error(to, error_code)), now,
                 run.id, str(StepStatus.STARTED)),
            )
        head = await self._audit(cur, run.id, [*audit, event], now, run.audit_head)
        return moved.with_head(head)

    async def request_cancel(self, run_id: str, tenant: str | None = None) -> RunRecord:
        """As SQLite, but decided under the row lock so a concurrent claim cannot interleave."""
        async with self._tx() as cur:
            run = await self._fence(cur, run_id, None)
            if tenant is not None and run.tenant != tenant:
                raise NotFound(f"run {run_id} not found")
            if run.state.terminal:
                return run
            if run.state == RunState.RUNNING:
                await cur.execute(
                    "UPDATE runs SET cancel_requested=TRUE WHERE id=%s RETURNING *", (run_id,)
                )
                row = await cur.fetchone()
                head = await self._audit(
                    cur,
                    run_id,
                    [AuditEvent(kind="cancel.requested", actor="user")],
                    run.updated_at,
                    run.audit_head,
                )
                return self._run(row).with_head(head) if row else run
            return await self._transition(
                cur,
                run,
                RunState.CANCELLED,
                run.updated_at,
                epoch=None,
                error_code="cancelled",
                error_message="cancelled by user",
            )

    async def requeue_expired(self, now: float, *, max_attempts: int | None = None) -> list[str]:
        async with self._read() as cur:
            await cur.execute(
                "SELECT id FROM runs WHERE state=%s AND lease_expires_at < %s "
                "ORDER BY created_at, id",
                (str(RunState.RUNNING), now),
            )
            ids = [str(r["id"]) for r in await cur.fetchall()]
        done = []
        for run_id in ids:
            async with self._tx() as cur:
                # SKIP LOCKED: a row locked by a (paused) writer is left for the next sweep
                # instead of blocking the reaper, and with it the whole worker.
                await cur.execute("SELECT * FROM runs WHERE id=%s FOR UPDATE SKIP LOCKED",
                                  (run_id,))
                row = await cur.fetchone()
                if row is None:
                    continue
                run = self._run(row)
                if run.state != RunState.RUNNING or (run.lease_expires_at or 0) >= now:
                    continue
                why = f"lease of {run.lease_owner} expired"
                rec = recover_run(run, why, max_attempts)
                await self._recover(cur, run, rec, now)
                if not rec.quarantined:
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
    ) -> RunFlags:
        """Journal a step; ``reserve`` debits the run's ledgers first (once per step, atomically
        with the journal write), ``settle`` corrects them with actual usage.

        One statement when this store wrote the run's previous journal entry (see
        :class:`_Known`): the chain head and ledger values it left are what the server-side
        ``alpaca_journal_steps`` checks under the row locks before writing. Otherwise, or when
        anything moved meanwhile (an approval decided or a cancel requested elsewhere, a
        sibling's reservation on a shared ledger, a step reserved before a crash), the locked
        transaction below reads the current values and writes.
        """
        known = self._known.get(step.run_id)
        if known is not None and known.epoch == epoch:
            flags = await self._save_step_fast(step, epoch, audit, reserve, settle, known)
            if flags is not None:
                return flags
        return await self._save_step_locked(step, epoch, audit, reserve, settle)

    def _plan_fast(self, write: StepWrite, epoch: int, known: _Known) -> _Planned | None:
        """The one-statement journal write of ``write`` on ``known``, worked out client-side;
        None when the budget may not fit (decided on the current values, under the lock)."""
        step, audit, reserve, settle = write.step, write.audit, write.reserve, write.settle
        ledgers: list[ledger_logic.LedgerState] | None = None
        over: ledger_logic.BudgetExceeded | None = None
        exhaust: dict[str, str] = {}
        if reserve or settle:
            if known.ledgers is None:
                return None
            ledgers = [ledger_logic.LedgerState(led.id, dict(led.limits), dict(led.used),
                                                led.exhausted) for led in known.ledgers]
            if reserve:
                try:
                    ledger_logic.check_reserve(ledgers, reserve)
                except ledger_logic.BudgetExceeded:
                    return None
                for led in ledgers:
                    ledger_logic.apply(led, reserve)
            if settle:
                for led in ledgers:
                    ledger_logic.apply(led, settle)
                over = ledger_logic.overspent(ledgers, settle)
                if over is not None:  # the usage stays recorded; the tree stops
                    exhaust[over.ledger_id] = over.resource
        cas = None if ledgers is None else {
            was.id: {"used": was.used, "exhausted": was.exhausted, "new": now.used,
                     "exhaust": exhaust.get(now.id)}
            for was, now in zip(known.ledgers or (), ledgers, strict=True)}
        records = self._records(step.run_id, audit, step.finished_at or step.started_at,
                                known.head)
        reserved = dict(reserve) if reserve else step.reserved
        payload = {
            "run": step.run_id, "epoch": epoch, "hs": known.head[0], "hh": known.head[1],
            "nh": records[-1].hash if records else None,
            "t": records[0].time if records else None,
            "audit": [{"a": r.actor, "k": r.kind, "d": r.data_json, "p": r.prev_hash,
                       "h": r.hash} for r in records],
            "seq": step.seq, "kind": str(step.kind), "name": step.name,
            "status": str(step.status), "input": step.input, "output": step.output,
            "error": step.error, "ik": step.idempotency_key, "attempts": step.attempts,
            "sa": step.started_at, "fa": step.finished_at, "reserved": reserved,
            "reserves": bool(reserve), "ledgers": cas}
        for led in ledgers or ():
            led.exhausted = led.exhausted or exhaust.get(led.id)
        head = (records[-1].seq, records[-1].hash) if records else known.head
        after = _Known(epoch, head, tuple(ledgers) if ledgers else known.ledgers)
        return _Planned(write, payload, reserved, after, over)

    def _written(self, planned: _Planned, status: str) -> None:
        """What a planned write's status means: ``ok`` is remembered; a lost lease or a
        closed or missing run raises; anything else wrote nothing (take the locked path)."""
        run_id = planned.write.step.run_id
        if status == "missing":
            raise NotFound(f"run {run_id} not found")
        if status in ("lease_lost", "closed"):
            self._forget(run_id)
            raise LeaseLost(run_id, planned.after.epoch)
        if status == "ok":
            planned.write.step.reserved = planned.reserved
            self._note(run_id, planned.after.epoch, planned.after.head, planned.after.ledgers)

    async def _save_step_fast(
        self,
        step: StepRecord,
        epoch: int,
        audit: Sequence[AuditEvent],
        reserve: dict[str, float] | None,
        settle: dict[str, float] | None,
        known: _Known,
    ) -> RunFlags | None:
        """The one-statement journal write on ``known``; None: nothing was written (the
        assumptions were stale, or the budget may not fit), take the locked path."""
        planned = self._plan_fast(StepWrite(step, audit, reserve, settle), epoch, known)
        if planned is None:
            return None
        try:
            flags, done, _ = await self._journal_steps([planned], False)
        except _StaleLedger:
            return None  # a sibling's debit since this store's: nothing written
        if not done:
            return None
        if planned.over is not None:
            raise planned.over
        return flags

    async def save_steps(
        self, writes: Sequence[StepWrite], epoch: int, *, unless_cancelled: bool = False,
    ) -> Journaled:
        """Two or more writes in one transaction and one round trip (:meth:`_journal_steps`)
        when this store wrote the run's previous entry; from the first that could not be made
        so (a stale assumption), one :meth:`save_step` after another."""
        if len(writes) == 1 and not unless_cancelled:
            w = writes[0]
            return Journaled(await self.save_step(w.step, epoch, w.audit, reserve=w.reserve,
                                                  settle=w.settle))
        flags: RunFlags | None = None
        done = 0
        plans = self._plans(writes, epoch) if len(writes) > 1 else []
        if plans:
            try:
                flags, done, skipped = await self._journal_steps(plans, unless_cancelled)
            except _StaleLedger:
                flags, done, skipped = None, 0, False
            if skipped:
                return Journaled(flags, skipped=True)
        return await save_in_turn(self, writes[done:], epoch, unless_cancelled=unless_cancelled,
                                  flags=flags)

    async def _journal_steps(
        self, plans: list[_Planned], unless_cancelled: bool,
    ) -> tuple[RunFlags | None, int, bool]:
        """The planned writes in one statement (``alpaca_journal_steps``, migration 8): the
        last flags, how many were written, and whether the last was skipped for a cancel
        request. Each write checks the chain head the one before it left, so none is made
        after one that was not."""
        payload = json.dumps([plan.payload for plan in plans])
        with observers.transaction():
            async with self._read() as cur:
                try:
                    await cur.execute(_JOURNAL_STEPS, (payload, unless_cancelled))
                except psycopg.Error as exc:
                    if exc.sqlstate != _STALE_LEDGER:
                        raise
                    raise _StaleLedger from None  # the statement wrote nothing
                row = await cur.fetchone()
            results = _results(row)
            done = 0
            for plan, result in zip(plans, results, strict=False):
                if result[0] != "ok":
                    break
                observers.written(plan.write.step.run_id, plan.write.audit)
                done += 1
        flags: RunFlags | None = None
        for plan, result in zip(plans, results, strict=False):
            self._written(plan, result[0])
            if result[0] != "ok":
                break
            flags = RunFlags(int(result[1]), result[2] == "t")
        skipped = unless_cancelled and results[-1][0] == "skipped"
        return flags, done, skipped

    async def _save_step_locked(
        self, step: StepRecord, epoch: int, audit: Sequence[AuditEvent],
        reserve: dict[str, float] | None, settle: dict[str, float] | None,
    ) -> RunFlags:
        """The journal write in a transaction that reads what it needs under the locks.

        The run row is locked by the fence, then the ledger rows (by id), so the check and the
        debit see no concurrent reservation. A refused reservation writes nothing for the step;
        the ledger is then marked exhausted in its own transaction and BudgetExceeded raised.
        """
        refused: ledger_logic.BudgetExceeded | None = None
        over: ledger_logic.BudgetExceeded | None = None
        async with self._tx() as cur:
            run = await self._fence(cur, step.run_id, epoch, journal=True)
            ledgers: list[ledger_logic.LedgerState] | None = None
            if reserve:
                await cur.execute(
                    "SELECT reserved FROM steps WHERE run_id=%s AND seq=%s",
                    (step.run_id, step.seq),
                )
                row = await cur.fetchone()
                if row is not None and row["reserved"] is not None:
                    step.reserved = dict(row["reserved"])  # reserved before a crash: not twice
                else:
                    ledgers = await self._lock_ledgers(cur, run.ledgers)
                    try:
                        ledger_logic.check_reserve(ledgers, reserve)
                    except ledger_logic.BudgetExceeded as exc:
                        refused = exc
                    else:
                        await self._debit(cur, ledgers, reserve)
                        step.reserved = dict(reserve)
            if refused is None:
                if settle:
                    ledgers = await self._lock_ledgers(cur, run.ledgers)
                    await self._debit(cur, ledgers, settle)
                    over = ledger_logic.overspent(ledgers, settle)
                    if over is not None:  # the usage stays recorded; the tree stops
                        await cur.execute(
                            "UPDATE ledgers SET exhausted=COALESCE(exhausted, %s) WHERE id=%s",
                            (over.resource, over.ledger_id),
                        )
                        for led in ledgers:
                            if led.id == over.ledger_id and led.exhausted is None:
                                led.exhausted = over.resource
                elif ledgers is None and run.ledgers:
                    ledgers = await self._read_ledgers(cur, run.ledgers)
                await self._write_step(cur, step)
                head = await self._audit(
                    cur, step.run_id, audit, step.finished_at or step.started_at, run.audit_head
                )
        if refused is not None:
            self._forget(step.run_id)
            async with self._tx() as cur:
                await cur.execute(
                    "UPDATE ledgers SET exhausted=COALESCE(exhausted, %s) WHERE id=%s",
                    (refused.resource, refused.ledger_id),
                )
            raise refused
        self._note(step.run_id, epoch, head, None if ledgers is None else tuple(ledgers))
        if over is not None:
            raise over
        return RunFlags(run.epoch, run.cancel_requested)

    @staticmethod
    async def _write_step(cur: Cursor, step: StepRecord) -> None:
        await cur.execute(
            "INSERT INTO steps(run_id, seq, kind, name, status, input, output, error, "
            "idempotency_key, attempts, started_at, finished_at, reserved) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (run_id, seq) "
            "DO UPDATE SET status=excluded.status, input=excluded.input, "
            "output=excluded.output, error=excluded.error, attempts=excluded.attempts, "
            "finished_at=excluded.finished_at, "
            "reserved=COALESCE(excluded.reserved, steps.reserved)",
            (
                step.run_id,
                step.seq,
                str(step.kind),
                step.name,
                str(step.status),
                Jsonb(step.input),
                _jsonb(step.output),
                _jsonb(step.error),
                step.idempotency_key,
                step.attempts,
                step.started_at,
                step.finished_at,
                _jsonb(step.reserved),
            ),
        )

    @staticmethod
    def _ledger_state(row: DictRow) -> ledger_logic.LedgerState:
        return ledger_logic.LedgerState(
            id=str(row["id"]),
            limits=dict(row["limits"]),
            used=dict(row["used"]),
            exhausted=row["exhausted"],
        )

    async def _lock_ledgers(
        self, cur: Cursor, ids: Sequence[str], *, lock: bool = True
    ) -> list[ledger_logic.LedgerState]:
        """Lock the ledger rows ``FOR UPDATE`` in id order (one global order: concurrent
        reservations on overlapping ledger sets cannot deadlock) and return their states in
        the run's own order (root first), skipping ids without a ledger, as SQLite does."""
        if not ids:
            return []
        await cur.execute(
            "SELECT * FROM ledgers WHERE id = ANY(%s) ORDER BY id"
            + (" FOR UPDATE" if lock else ""), (list(ids),)
        )
        rows = {str(r["id"]): r for r in await cur.fetchall()}
        return [self._ledger_state(rows[lid]) for lid in ids if lid in rows]

    async def _read_ledgers(
        self, cur: Cursor, ids: Sequence[str]
    ) -> list[ledger_logic.LedgerState]:
        """The ledgers' current values without a lock: only what the next one-statement write
        assumes (and the server checks)."""
        return await self._lock_ledgers(cur, ids, lock=False)

    @staticmethod
    async def _debit(
        cur: Cursor, ledgers: list[ledger_logic.LedgerState], amounts: dict[str, float]
    ) -> None:
        for ledger in ledgers:
            ledger_logic.apply(ledger, amounts)
            await cur.execute(
                "UPDATE ledgers SET used=%s WHERE id=%s", (Jsonb(ledger.used), ledger.id)
            )

    async def get_ledger(self, ledger_id: str) -> LedgerRecord:
        async with self._read() as cur:
            await cur.execute("SELECT * FROM ledgers WHERE id=%s", (ledger_id,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"ledger {ledger_id} not found")
        state = self._ledger_state(row)
        return LedgerRecord(
            id=state.id, limits=state.limits, used=state.used, exhausted=state.exhausted
        )

    async def list_steps(self, run_id: str) -> list[StepRecord]:
        async with self._read() as cur:
            await cur.execute("SELECT * FROM steps WHERE run_id=%s ORDER BY seq", (run_id,))
            rows = await cur.fetchall()
        return [self._step(r) for r in rows]

    async def append_audit(
        self, run_id: str, events: Sequence[AuditEvent], now: float, *, epoch: int | None = None
    ) -> None:
        async with self._tx() as cur:
            run = await self._fence(cur, run_id, epoch, journal=True)
            head = await self._audit(cur, run_id, events, now, run.audit_head)
        self._note_head(run_id, epoch, head)

    async def list_audit(self, run_id: str, after_seq: int = 0) -> list[AuditRecord]:
        async with self._read() as cur:
            await cur.execute(
                "SELECT * FROM audit WHERE run_id=%s AND seq>%s ORDER BY seq", (run_id, after_seq)
            )
            rows = await cur.fetchall()
        return [AuditRecord.from_dict(r) for r in rows]

    # -- approvals -----------------------------------------------------------------------------
    @staticmethod
    def _approval(row: DictRow) -> ApprovalRecord:
        return ApprovalRecord.model_validate(row)

    async def create_approval(
        self, approval: ApprovalRecord, epoch: int, audit: Sequence[AuditEvent] = ()
    ) -> ApprovalRecord:
        """Record a pending approval for a step; the same step never gets two (the run row lock
        serializes concurrent requests for one run)."""
        data = approval.model_dump()
        data["arguments"] = Jsonb(approval.arguments)
        data["status"] = str(approval.status)
        query = sql.SQL("INSERT INTO approvals ({cols}) VALUES ({vals})").format(
            cols=sql.SQL(", ").join(map(sql.Identifier, data)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(data)),
        )
        async with self._tx() as cur:
            run = await self._fence(cur, approval.run_id, epoch, journal=True)
            await cur.execute(
                "SELECT * FROM approvals WHERE run_id=%s AND step=%s",
                (approval.run_id, approval.step),
            )
            row = await cur.fetchone()
            if row is not None:
                return self._approval(row)
            await cur.execute(query, tuple(data.values()))
            head = await self._audit(
                cur, approval.run_id, audit, approval.created_at, run.audit_head)
        self._note_head(approval.run_id, epoch, head)
        return approval

    async def get_approval(self, approval_id: str, tenant: str | None = None) -> ApprovalRecord:
        async with self._read() as cur:
            await cur.execute("SELECT * FROM approvals WHERE id=%s", (approval_id,))
            row = await cur.fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"approval {approval_id} not found")
        return self._approval(row)

    async def get_step_approval(self, run_id: str, step: int) -> ApprovalRecord | None:
        async with self._read() as cur:
            await cur.execute("SELECT * FROM approvals WHERE run_id=%s AND step=%s", (run_id, step))
            row = await cur.fetchone()
        return self._approval(row) if row is not None else None

    async def list_approvals(
        self,
        *,
        tenant: str | None = None,
        status: ApprovalStatus | None = None,
        run_id: str | None = None,
        limit: int = 100,
    ) -> list[ApprovalRecord]:
        rows = await self._newest("approvals", {"tenant": tenant, "status": status,
                                                "run_id": run_id}, limit)
        return [self._approval(r) for r in rows]

    async def _locked_approval(
        self, cur: Cursor, approval_id: str, tenant: str | None = None
    ) -> ApprovalRecord:
        """Lock the approval row; a concurrent decision waits here and then re-reads the row
        (READ COMMITTED), so it sees the winner's status."""
        await cur.execute("SELECT * FROM approvals WHERE id=%s FOR UPDATE", (approval_id,))
        row = await cur.fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"approval {approval_id} not found")
        return self._approval(row)

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
        async with self._tx() as cur:
            approval = await self._locked_approval(cur, approval_id, tenant)
            if approval.status != ApprovalStatus.PENDING:
                raise ApprovalConflict(f"approval {approval_id} is already {approval.status}")
            run = await self._fetch_run(cur, approval.run_id, lock=True)
            if run.state.terminal:
                raise ApprovalConflict(closed_run_decision(approval_id, run))
            status = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
            await cur.execute(
                "UPDATE approvals SET status=%s, decided_by=%s, decided_at=%s, comment=%s "
                "WHERE id=%s",
                (str(status), by, now, comment, approval_id),
            )
            events = [
                AuditEvent(
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
            ]
            await self._wake(cur, run, now, events, "approval decided")
            return approval.model_copy(
                update={"status": status, "decided_by": by, "decided_at": now, "comment": comment}
            )

    async def _wake(
        self, cur: Cursor, run: RunRecord, now: float, events: list[AuditEvent], why: str
    ) -> None:
        """Requeue a waiting run (row locked by the caller for the state change and the audit
        append); a finished run's chain is closed, so a late expiry is kept on the approval."""
        if run.state.terminal:
            return
        if run.state == RunState.WAITING:
            events.append(self._set_state(run, RunState.QUEUED, None, why))
            await cur.execute(
                "UPDATE runs SET state=%s, updated_at=%s WHERE id=%s",
                (str(RunState.QUEUED), now, run.id),
            )
        await self._audit(cur, run.id, events, now, run.audit_head)

    async def expire_approvals(self, now: float) -> list[ApprovalRecord]:
        """Pending approvals past their expiry: marked expired; the run is woken to apply its
        policy (a ``deny`` fails it at its next turn)."""
        async with self._read() as cur:
            await cur.execute(
                "SELECT id FROM approvals WHERE status=%s AND expires_at IS NOT NULL AND "
                "expires_at < %s ORDER BY created_at, id",
                (str(ApprovalStatus.PENDING), now),
            )
            ids = [str(r["id"]) for r in await cur.fetchall()]
        out = []
        for approval_id in ids:
            async with self._tx() as cur:
                try:
                    approval = await self._locked_approval(cur, approval_id)
                except NotFound:  # pragma: no cover - approvals are never deleted
                    continue
                if approval.status != ApprovalStatus.PENDING:
                    continue  # decided (or expired by another reaper) since the scan
                await cur.execute(
                    "UPDATE approvals SET status=%s, decided_by=%s, decided_at=%s WHERE id=%s",
                    (str(ApprovalStatus.EXPIRED), "system:expiry", now, approval_id),
                )
                events = [
                    AuditEvent(
                        kind="approval.expired",
                        actor="system:expiry",
                        data={"approval_id": approval_id, "policy": approval.on_expiry},
                    )
                ]
                run = await self._fetch_run(cur, approval.run_id, lock=True)
                await self._wake(cur, run, now, events, "approval expired")
                out.append(approval.model_copy(update={"status": ApprovalStatus.EXPIRED}))
        return out

    # -- API keys ------------------------------------------------------------------------------
    async def create_api_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        async with self._tx() as cur:
            await cur.execute(
                "INSERT INTO api_keys(id, tenant, role, key_hash, name, created_at, revoked_at) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s)",
                (
                    key.id,
                    key.tenant,
                    key.role,
                    key.key_hash,
                    key.name,
                    key.created_at,
                    key.revoked_at,
                ),
            )
        return key

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        async with self._read() as cur:
            await cur.execute(
                "SELECT * FROM api_keys WHERE key_hash=%s AND revoked_at IS NULL", (key_hash,)
            )
            row = await cur.fetchone()
        return ApiKeyRecord.model_validate(row) if row is not None else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        where, args = ("", ()) if tenant is None else (" WHERE tenant=%s", (tenant,))
        async with self._read() as cur:
            await cur.execute(f"SELECT * FROM api_keys{where} ORDER BY created_at, id", args)
            rows = await cur.fetchall()
        return [ApiKeyRecord.model_validate(r) for r in rows]

    # -- registered workflows ------------------------------------------------------------------
    async def put_workflow(self, workflow: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        """Read the latest version and insert the next; a concurrent push that took the same
        number makes the insert violate the primary key, and the whole read-insert is
        retried against the new latest (READ COMMITTED sees the winner's commit)."""
        for _attempt in range(_PUT_ATTEMPTS):
            try:
                async with self._tx() as cur:
                    await cur.execute(
                        "SELECT * FROM workflows WHERE tenant=%s AND name=%s "
                        "ORDER BY version DESC LIMIT 1", (workflow.tenant, workflow.name))
                    row = await cur.fetchone()
                    if row is not None and row["content_hash"] == workflow.content_hash:
                        return WorkflowRecord.model_validate(row), False
                    stored = workflow.model_copy(
                        update={"version": (int(row["version"]) if row else 0) + 1})
                    await cur.execute(
                        "INSERT INTO workflows(tenant, name, version, content_hash, author, "
                        "created_at, format, source) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                        (stored.tenant, stored.name, stored.version, stored.content_hash,
                         stored.author, stored.created_at, stored.format, stored.source))
                return stored, True
            except errors.UniqueViolation:
                continue  # another push took this number first: read the new latest
        raise RuntimeError(f"workflow {workflow.name!r}: {_PUT_ATTEMPTS} concurrent pushes "
                           "won the version number first; push again")

    async def get_workflow(self, tenant: str, name: str,
                           version: int | None = None) -> WorkflowRecord:
        query = "SELECT * FROM workflows WHERE tenant=%s AND name=%s"
        args: tuple[object, ...] = (tenant, name)
        if version is not None:
            query, args = query + " AND version=%s", (*args, version)
        async with self._read() as cur:
            await cur.execute(query + " ORDER BY version DESC LIMIT 1", args)
            row = await cur.fetchone()
        if row is None:
            raise NotFound(workflow_not_found(name, version))
        return WorkflowRecord.model_validate(row)

    async def list_workflows(self, tenant: str) -> list[WorkflowRecord]:
        async with self._read() as cur:
            await cur.execute(
                "SELECT DISTINCT ON (name) * FROM workflows WHERE tenant=%s "
                "ORDER BY name, version DESC", (tenant,))
            rows = await cur.fetchall()
        return [WorkflowRecord.model_validate(r) for r in rows]

    async def list_workflow_versions(self, tenant: str, name: str) -> list[WorkflowRecord]:
        async with self._read() as cur:
            await cur.execute("SELECT * FROM workflows WHERE tenant=%s AND name=%s "
                              "ORDER BY version DESC", (tenant, name))
            rows = await cur.fetchall()
        return [WorkflowRecord.model_validate(r) for r in rows]

    # -- threads ---------------------------------------------------------------------------------
    async def _fetch_thread(self, cur: Cursor, thread_id: str, tenant: str | None, *,
                            deleted: bool = False, lock: bool = False) -> ThreadRecord:
        """The thread row (``lock``: ``FOR UPDATE``, which serializes the turns, forks and
        the deletion of one thread across processes)."""
        await cur.execute("SELECT * FROM threads WHERE id=%s" + (" FOR UPDATE" if lock else ""),
                          (thread_id,))
        row = await cur.fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant) or (
                row["deleted_at"] is not None and not deleted):
            raise NotFound(thread_not_found(thread_id))
        return ThreadRecord.model_validate(row)

    async def _thread_audit(self, cur: Cursor, thread_id: str, events: Sequence[AuditEvent],
                            now: float) -> None:
        """Append to the thread's own chain; callers hold the thread row lock (or just
        inserted the thread), so the head read here cannot be raced."""
        if not events:
            return
        await cur.execute("SELECT seq, hash FROM thread_audit WHERE thread_id=%s "
                          "ORDER BY seq DESC LIMIT 1", (thread_id,))
        row = await cur.fetchone()
        chain = AuditChain(thread_id, self.audit_key,
                           *((int(row["seq"]), str(row["hash"])) if row else (0, GENESIS)))
        stamp = iso_utc(now)
        records = [chain.append(ev.kind, ev.data, ev.actor, stamp) for ev in events]
        await cur.executemany(
            "INSERT INTO thread_audit(thread_id, seq, time, actor, kind, data, prev_hash, hash) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
            [(r.run_id, r.seq, r.time, r.actor, r.kind, Json(r.data), r.prev_hash, r.hash)
             for r in records])

    async def _insert_thread(self, cur: Cursor, thread: ThreadRecord,
                             audit: Sequence[AuditEvent], ledger: LedgerRecord | None) -> None:
        data = thread.model_dump()
        data["metadata"], data["budget"] = Jsonb(thread.metadata), Jsonb(thread.budget)
        await cur.execute(sql.SQL("INSERT INTO threads ({cols}) VALUES ({vals})").format(
            cols=sql.SQL(", ").join(map(sql.Identifier, data)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(data))), tuple(data.values()))
        if ledger is not None:
            await self._insert_ledger(cur, ledger, thread.created_at)
        await self._thread_audit(cur, thread.id, audit, thread.created_at)

    async def create_thread(
        self, thread: ThreadRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> ThreadRecord:
        async with self._tx() as cur:
            await self._insert_thread(cur, thread, audit, ledger)
        return thread

    async def get_thread(self, thread_id: str, tenant: str | None = None, *,
                         deleted: bool = False) -> ThreadRecord:
        async with self._read() as cur:
            return await self._fetch_thread(cur, thread_id, tenant, deleted=deleted)

    async def list_threads(self, *, tenant: str | None = None,
                           limit: int = 100) -> list[ThreadRecord]:
        where, args = ("", ()) if tenant is None else (" AND tenant=%s", (tenant,))
        async with self._read() as cur:
            await cur.execute(f"SELECT * FROM threads WHERE deleted_at IS NULL{where} "
                              "ORDER BY updated_at DESC, id DESC LIMIT %s",
                              (*args, None if limit < 0 else limit))
            rows = await cur.fetchall()
        return [ThreadRecord.model_validate(r) for r in rows]

    async def _turns(self, cur: Cursor, thread_id: str, last: bool = False) -> list[RunRecord]:
        await cur.execute("SELECT * FROM runs WHERE thread_id=%s ORDER BY turn" +
                          (" DESC LIMIT 1" if last else ""), (thread_id,))
        return [self._run(r) for r in await cur.fetchall()]

    async def create_turn(
        self, run: RunRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        """The thread row lock serializes concurrent messages: the second sees the first's
        turn (READ COMMITTED re-reads after the lock) and is refused."""
        thread_id = run.thread_id or ""
        async with self._tx() as cur:
            for locked in (False, True):  # the key again once locked: a concurrent replay
                if run.idempotency_key:
                    await cur.execute("SELECT * FROM runs WHERE tenant=%s AND "
                                      "idempotency_key=%s", (run.tenant, run.idempotency_key))
                    row = await cur.fetchone()
                    if row is not None:
                        return self._run(row), False
                if not locked:
                    await self._fetch_thread(cur, thread_id, run.tenant, lock=True)
            last = await self._turns(cur, thread_id, last=True)
            run = run.model_copy(update={"turn": next_turn(thread_id, last[0] if last else None)})
            created = await self._insert_run(cur, run, audit, ledger)
            if created is None:  # the same key committed on another thread meanwhile
                return await self._idempotent(cur, run), False
            await cur.execute("UPDATE threads SET updated_at=%s WHERE id=%s",
                              (run.created_at, thread_id))
            await self._thread_audit(cur, thread_id, [turn_created(created)], run.created_at)
        return created, True

    async def list_turns(self, thread_id: str) -> list[RunRecord]:
        async with self._read() as cur:
            return await self._turns(cur, thread_id)

    async def fork_thread(self, thread: ThreadRecord, copies: Sequence[TurnCopy],
                          audit: Sequence[AuditEvent] = (),
                          ledger: LedgerRecord | None = None) -> ThreadRecord:
        async with self._tx() as cur:
            if thread.forked_from is not None:  # locked: a concurrent delete waits or wins
                await self._fetch_thread(cur, thread.forked_from, thread.tenant, lock=True)
            await self._insert_thread(cur, thread, audit, ledger)
            for copy in copies:
                await self._insert_run(cur, copy.run, copy.audit, None)
                for step in copy.steps:
                    await self._write_step(cur, step)
        return thread

    async def delete_thread(self, thread_id: str, now: float, *, tenant: str | None = None,
                            actor: str = "user") -> ThreadRecord:
        async with self._tx() as cur:
            thread = await self._fetch_thread(cur, thread_id, tenant, lock=True)
            turns = await self._turns(cur, thread_id)
            check_deletable(thread_id, turns)
            numbers = {t.id: t.turn for t in turns}
            await cur.execute("SELECT id, root_id, audit_seq, audit_hash FROM runs WHERE "
                              "root_id = ANY(%s) ORDER BY created_at, id FOR UPDATE",
                              (list(numbers),))
            rows = await cur.fetchall()
            erased = [Erased(str(r["id"]), numbers.get(str(r["id"])), int(r["audit_seq"]),
                             str(r["audit_hash"]))
                      for t in turns for r in rows if r["root_id"] == t.id]
            ids = [e.run_id for e in erased]
            await cur.execute("DELETE FROM audit WHERE run_id = ANY(%s)", (ids,))
            await cur.execute("DELETE FROM steps WHERE run_id = ANY(%s)", (ids,))
            await cur.execute("UPDATE approvals SET arguments='{}', comment=NULL "
                              "WHERE run_id = ANY(%s)", (ids,))
            await cur.execute("UPDATE runs SET input=%s, output=NULL, error_message=NULL "
                              "WHERE id = ANY(%s)", (ERASED, ids))
            await cur.execute("UPDATE threads SET title=%s, metadata='{}', deleted_at=%s, "
                              "updated_at=%s WHERE id=%s", (ERASED, now, now, thread_id))
            await self._thread_audit(cur, thread_id, [thread_deleted(erased, actor)], now)
        return thread.model_copy(update={"title": ERASED, "metadata": {},
                                         "deleted_at": now, "updated_at": now})

    async def list_thread_audit(self, thread_id: str, after_seq: int = 0) -> list[AuditRecord]:
        async with self._read() as cur:
            await cur.execute("SELECT * FROM thread_audit WHERE thread_id=%s AND seq>%s "
                              "ORDER BY seq", (thread_id, after_seq))
            rows = await cur.fetchall()
        return [AuditRecord.from_dict({**r, "run_id": r["thread_id"]}) for r in rows]

"""The embedded default store: one SQLite file in WAL mode, safe across processes.

Writes run in ``BEGIN IMMEDIATE`` transactions so the epoch check and the write it guards
are atomic even when several processes share the file.

The event loop never waits on the file's lock. A file database has two connections: the
loop's, which never waits (``busy_timeout=0``), and a writer thread's, which does (30 s).
Each store operation (a *unit*: at most one transaction) runs inline on the loop's
connection, the fast path. When another process holds the lock, the unit fails at once with
SQLITE_BUSY before writing anything (at ``BEGIN IMMEDIATE``, or a read) and runs again,
whole, on the writer thread, while the loop keeps serving (heartbeats, other runs, HTTP).
When the lock holder is the writer thread itself (a unit there, a checkpoint: short, never
waiting for anyone), the unit waits for it without blocking and runs inline again, so
concurrent runs never drift onto the thread one after another.

Order: a caller awaits its unit, so its next write never overtakes it; units of different
callers in flight at once have no order to keep (as with any two concurrent writers). A unit
whose caller was cancelled still runs, and the loop's writes queue behind it until it ends,
so a cancelled flow's next write never lands first.

The loop's connection never checkpoints either (``wal_autocheckpoint=0``): the thread
checkpoints every :data:`CHECKPOINT_EVERY` inline commits, so a commit never pays a
checkpoint's fsyncs inline, and the WAL stays bounded (when a checkpoint falls behind, the
loop's writes wait for it).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from .. import budget as ledger_logic
from ..errors import ApprovalConflict, LeaseLost, NotFound
from ..faults import Fault, StoreUnavailable, translating_faults
from ..lifecycle import RunState, check_transition
from ..sqlite_url import parse_sqlite_url
from ..sqlite_wal import enable_wal, is_busy
from ..telemetry.audit import GENESIS, AuditChain, AuditRecord, iso_utc
from . import observers
from .base import Journaled, RunFlags, StepWrite
from .migrations import SQLITE as MIGRATIONS
from .ownership import ClaimPlan, Recovery, closed_run_decision, plan_claim
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

_JSON_RUN_FIELDS = ("ancestry", "budget", "usage", "ledgers")
_JSON_THREAD_FIELDS = ("metadata", "budget")
_AUDIT_INSERT = ("INSERT INTO audit(run_id, seq, time, actor, kind, data, prev_hash, hash) "
                 "VALUES (?,?,?,?,?,?,?,?)")
_MOVE_HEAD = "UPDATE runs SET audit_seq=?, audit_hash=? WHERE id=?"
_NARROW = frozenset({"root_id", "parent_id", "run_id"})
"""Filters of :meth:`SQLiteStore._newest` naming a few rows: a run tree, a run's children,
a run's approvals."""

log = logging.getLogger("alpaca.store")

BUSY_TIMEOUT = 30.0
"""Seconds the writer thread waits for another process's write lock (the loop never waits)."""
CHECKPOINT_EVERY = 200
"""Inline commits between two WAL checkpoints on the writer thread (5-7 pages each: about
SQLite's own 1,000-page default)."""
RESTART_WAIT = 0.01
"""Seconds a checkpoint's rewind waits for a transaction in the way (while it holds the
write lock, the loop's writes queue on the writer thread instead)."""

P = ParamSpec("P")
R = TypeVar("R")
_C = TypeVar("_C", bound=type)
Unit = Callable[Concatenate["SQLiteStore", P], Coroutine[Any, Any, R]]


class _Offload(Exception):
    """Raised on the loop's connection before a unit's first write when it must run on the
    writer thread instead, behind a unit there (see :meth:`SQLiteStore._tx`)."""


class _Behind(Exception):
    """Raised on the loop's connection before a unit's first write while a checkpoint has
    fallen behind: the unit waits for it (not blocking the loop), then runs inline."""


def _finish(coro: Coroutine[Any, Any, R]) -> R:
    """Run a unit's coroutine, which never awaits (it only calls ``sqlite3``), to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(R, done.value)
    coro.close()
    raise RuntimeError("a SQLite store unit awaited: split it into units (see _composite)")


def _unit(fn: Unit[P, R]) -> Unit[P, R]:
    """Run ``fn`` inline on the loop's connection; if the file is locked (or a write must
    queue behind the thread), before anything was written, run it whole on the thread."""
    async def call(self: SQLiteStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._pool is None:  # :memory: (or closed): nothing else can lock it
            return await fn(self, *args, **kwargs)
        while True:
            self._inline_commits = 0
            releases = self._thread_releases
            try:
                return await fn(self, *args, **kwargs)  # never suspends: it only calls sqlite3
            except _Offload:
                break
            except _Behind:
                await self._after(lambda: self._checkpointing)
                continue
            except sqlite3.OperationalError as exc:
                if not is_busy(exc) or self._inline_commits:
                    raise  # a unit commits at most once; a BUSY after it is a real fault
            if not await self._thread_wrote(releases):
                break  # another process holds the lock: wait for it on the thread
        return await self._on_thread(fn, args, kwargs)

    functools.update_wrapper(call, fn)
    return call


def _nested(unit: Unit[P, R]) -> Unit[P, R]:
    """A unit's body, to call from another unit: in its transaction (see ``_tx``), never
    retried on its own."""
    return cast(Unit[P, R], unit.__wrapped__)  # type: ignore[attr-defined]


def _composite(fn: Unit[P, R]) -> Unit[P, R]:
    """Mark a public method that awaits units (several transactions): not itself a unit."""
    fn.__dict__["_composite"] = True
    return fn


def _units(cls: _C) -> _C:
    """Make every public coroutine method a unit (see :func:`_unit`), except ``open``,
    ``close`` and the composites."""
    for name, member in list(vars(cls).items()):
        if (name.startswith("_") or name in ("open", "close") or
                not inspect.iscoroutinefunction(member) or getattr(member, "_composite", False)):
            continue
        setattr(cls, name, _unit(member))
    return cls


class _JournalTx:
    """What the writes of one journal transaction left for the next: the run's chain (the
    records' rows, inserted at the end), the last step seq that has a row, and the run's
    ledgers, read once and debited in memory (written once, at the end)."""

    def __init__(self, chain: AuditChain, last_seq: int,
                 load: Callable[[], list[ledger_logic.LedgerState]]) -> None:
        self.chain = chain
        self.audit: list[tuple[object, ...]] = []
        self.last_seq = last_seq
        self._load = load
        self.ledgers: list[ledger_logic.LedgerState] | None = None
        self.debited = False

    def read(self) -> list[ledger_logic.LedgerState]:
        if self.ledgers is None:
            self.ledgers = self._load()
        return self.ledgers

    def debit(self, amounts: dict[str, float]) -> None:
        for ledger in self.read():
            ledger_logic.apply(ledger, amounts)
        self.debited = True


@dataclass(frozen=True)
class _Move:
    """What :meth:`SQLiteStore.transition` writes on the run row besides its state."""

    output: str | None
    output_type: str | None
    error_code: str | None
    error_message: str | None
    usage: dict[str, Any] | None
    audit: Sequence[AuditEvent]


def _columns(row: sqlite3.Row) -> dict[str, Any]:
    """``dict(row)`` without its lookup of every column by name (a scan of the names)."""
    return dict(zip(row.keys(), row, strict=True))


_raw_decode = json.JSONDecoder().raw_decode


def _json(text: str) -> Any:
    """``json.loads`` of a column: the text this store wrote (``json.dumps``: no whitespace
    around it) skips the wrapper's checks; any other text goes through ``json.loads``."""
    try:
        value, end = _raw_decode(text)
    except (ValueError, TypeError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def check_length(url: str, path: str) -> None:
    """Refuse a file shorter than its header says (truncated): SQLite itself would only
    notice when a query reaches a missing page. Skipped while a WAL holds pages not yet
    checkpointed into the file."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
        size = Path(path).stat().st_size
        wal = Path(path + "-wal")
        if len(header) < 100 or not header.startswith(b"SQLite format 3\x00") or (
                wal.exists() and wal.stat().st_size > 0):
            return  # empty (new) file, or a bad header SQLite reports itself
    except OSError:
        return
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # "in-header database size" is trustworthy
    if valid and pages and size < pages * page_size:
        where = str(Path(path).resolve())
        raise StoreUnavailable(url, Fault.CORRUPT, f"{where} is truncated ({size} bytes, its "
                               f"header says {pages * page_size})",
                               "Restore it from a backup, or point ALPACA_DATABASE_URL at "
                               "another file")


@translating_faults
@_units
class SQLiteStore:
    migrations_applied: tuple[int, ...] = ()
    """What the last :meth:`open` applied (``alpaca db upgrade`` reports it)."""

    def __init__(self, url: str = "sqlite:///./alpaca.db", audit_key: bytes | None = None):
        self.url = url
        parsed = parse_sqlite_url(url)
        self.path = parsed.path
        self.synchronous = parsed.synchronous
        """``PRAGMA synchronous`` of every connection (``?synchronous=`` in the URL)."""
        self.audit_key = audit_key
        self._db: sqlite3.Connection | None = None
        """The event loop's connection (the only one for ``:memory:``)."""
        self._pool: ThreadPoolExecutor | None = None
        """The writer thread of a file database; ``None`` for ``:memory:``."""
        self._writer: tuple[int, sqlite3.Connection] | None = None
        """The writer thread's id and its own connection."""
        self._offloaded = 0
        """Units on the writer thread, not finished yet."""
        self._thread_units = 0
        """Units run on the writer thread so far (each found the file locked by another)."""
        self._orphaned = 0
        """Those whose caller was cancelled: the loop's writes queue behind them."""
        self._inline_commits = 0
        self._since_checkpoint = 0
        self._checkpointing = False
        self._thread_writing = False
        """The writer thread holds the write lock (a unit's transaction, a checkpoint)."""
        self._thread_releases = 0
        """How many times it let go of it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._written: list[asyncio.Future[None]] = []
        self._in_tx: set[int] = set()
        """The connections (by id) inside a unit's transaction: a unit called by another
        (:func:`_nested`) writes in that one."""

    # -- connection and schema -------------------------------------------------------------
    def _connect(self, busy_timeout: float, *, wal: bool = True) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=busy_timeout)
        try:
            db.row_factory = sqlite3.Row
            if wal:  # persistent: the loop's connection finds it set by the writer thread's
                enable_wal(db, busy_timeout)
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        except BaseException:
            db.close()
            raise
        return db

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path == ":memory:":
            db = self._connect(BUSY_TIMEOUT)
            try:
                self._db = db
                self._prepare()
            except BaseException:
                self._db = None
                db.close()
                raise
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        check_length(self.url, self.path)
        pool = ThreadPoolExecutor(1, thread_name_prefix="alpaca-sqlite-writer")
        loop = asyncio.get_running_loop()
        try:
            # Migrations may wait for another process's lock: on the thread, as any write.
            await loop.run_in_executor(pool, self._open_writer)
            db = await loop.run_in_executor(pool, self._open_inline)
        except BaseException:
            await loop.run_in_executor(pool, self._close_writer)
            pool.shutdown(wait=False)
            raise
        self._db, self._pool, self._loop = db, pool, loop

    def _open_writer(self) -> None:
        """On the writer thread: its connection, then the schema (migrations applied)."""
        self._writer = (threading.get_ident(), self._connect(BUSY_TIMEOUT))
        self._prepare()

    def _open_inline(self) -> sqlite3.Connection:
        """On the writer thread: the loop's connection. Its set-up reads the file, which
        another process opening it may hold a moment, so it waits like the writer; then it
        never waits again (``busy_timeout=0``) and never checkpoints (the thread does)."""
        db = self._connect(BUSY_TIMEOUT, wal=False)
        try:
            db.execute("PRAGMA busy_timeout=0")
            db.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            db.close()
            raise
        return db

    def _close_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer[1].close()

    def _prepare(self) -> None:
        self.migrations_applied = tuple(self.upgrade())
        self._check_writable()

    def _check_writable(self) -> None:
        """A read-only file opens and reads fine; say so now, not at the first write."""
        with self._tx() as db:
            db.execute("DELETE FROM schema_migrations WHERE 0")

    def schema_version(self) -> int:
        db = self._conn
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
        row = db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def upgrade(self) -> list[int]:
        """Apply pending migrations in order; return the versions applied."""
        applied = []
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
            current = int(db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
                          or 0)
            for version, script in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_migrations(version) VALUES (?)", (version,))
                applied.append(version)
        return applied

    async def close(self) -> None:
        db, self._db = self._db, None
        pool, self._pool = self._pool, None
        if db is not None:
            db.close()
        if pool is not None:  # after the units queued on it (first in, first out); the
            # last connection's close checkpoints the WAL, there and not on the loop
            await asyncio.get_running_loop().run_in_executor(pool, self._close_writer)
            pool.shutdown(wait=False)

    @property
    def _conn(self) -> sqlite3.Connection:
        """The writer thread's connection on that thread, else the loop's."""
        writer = self._writer
        db = writer[1] if writer is not None and writer[0] == threading.get_ident() else self._db
        if db is None:
            raise RuntimeError("store is not open")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A unit's one transaction; inside another unit's (see :func:`_nested`), that one."""
        db = self._conn
        if id(db) in self._in_tx:
            yield db
            return
        inline = self._pool is not None and db is self._db
        if inline and self._orphaned:
            raise _Offload  # nothing written yet: behind a cancelled caller's unit it goes
        if inline and self._checkpointing and self._since_checkpoint >= CHECKPOINT_EVERY:
            raise _Behind  # back pressure, so the WAL stays bounded
        with observers.transaction():
            db.execute("BEGIN IMMEDIATE")
            self._in_tx.add(id(db))
            try:
                if inline or self._pool is None:
                    yield db
                    db.execute("COMMIT")
                else:
                    with self._writing(True):
                        yield db
                        db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) may leave the transaction open, and SQLite may
                # already have rolled it back: either way the next BEGIN must find none open.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                self._in_tx.discard(id(db))
        if inline:
            self._inline_commits += 1
            self._since_checkpoint += 1
            if self._since_checkpoint >= CHECKPOINT_EVERY and not self._checkpointing:
                self._since_checkpoint, self._checkpointing = 0, True
                cast(ThreadPoolExecutor, self._pool).submit(self._checkpoint)

    @contextmanager
    def _writing(self, on_thread: bool) -> Iterator[None]:
        """Mark the writer thread as holding the write lock, and wake the loop's units that
        found the file locked by it when it lets go."""
        if not on_thread:
            yield
            return
        self._thread_writing = True
        try:
            yield
        finally:
            self._thread_writing = False
            self._thread_releases += 1
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._wake_written)

    def _wake_written(self) -> None:
        waiters, self._written = self._written, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _thread_wrote(self, releases: int) -> bool:
        """After a BUSY on the loop: if the writer thread holds the lock (a short transaction
        of this process, never waiting for anyone) or let go of it since the attempt began
        (``releases``), wait without blocking until it lets go and say so (the unit is tried
        inline again); ``False`` when someone else holds it."""
        if not self._thread_writing:
            return self._thread_releases != releases
        await self._after(lambda: self._thread_writing)
        return True

    async def _after(self, holding: Callable[[], bool]) -> None:
        """Wait (not blocking the loop) until the writer thread lets go of the write lock,
        while ``holding()``: the thread clears that flag before it wakes the loop."""
        waiter = asyncio.get_running_loop().create_future()
        self._written.append(waiter)
        if holding():  # else it let go meanwhile: go on at once
            await waiter

    def _checkpoint(self) -> None:
        """On the writer thread: copy the WAL back into the file and let the next writer
        rewind it (a passive checkpoint, racing the loop's commits, would never catch up,
        and the WAL would grow for ever). It waits at most :data:`RESTART_WAIT` for a
        writer or reader in the way, then copies what it can without waiting, and the next
        checkpoint tries again."""
        db = self._conn
        with self._writing(True):  # wakes the units held back, after the flag is cleared
            try:
                db.execute(f"PRAGMA busy_timeout={int(RESTART_WAIT * 1000)}")
                db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            except sqlite3.Error as exc:  # a full disk: the next checkpoint tries again
                log.info("WAL checkpoint of %s failed: %s", self.path, exc)
            finally:
                self._checkpointing = False
                db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")

    async def _on_thread(self, fn: Unit[P, R], args: Any, kwargs: Any) -> R:
        """Run a unit on the writer thread; the loop serves other work while it waits.

        Observers get what it committed on the loop. A cancelled caller does not cancel the
        unit (it may be committing): the loop's writes queue behind it until it ends."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        pool = cast(ThreadPoolExecutor, self._pool)
        done = loop.run_in_executor(pool, ctx.run, self._thread_unit, fn, args, kwargs)
        self._offloaded += 1
        self._thread_units += 1
        done.add_done_callback(self._landed)
        try:
            ok, value, _ = await asyncio.shield(done)
        except asyncio.CancelledError:
            if not done.done():
                self._orphaned += 1
                done.add_done_callback(self._orphan_landed)
            raise
        if not ok:
            raise cast(BaseException, value)
        return cast(R, value)

    def _thread_unit(self, fn: Unit[P, R], args: Any,
                     kwargs: Any) -> tuple[bool, object, observers.Batch]:
        with observers.held() as committed:
            try:
                return True, _finish(fn(self, *args, **kwargs)), committed
            except Exception as exc:
                return False, exc, committed

    def _orphan_landed(self, _: asyncio.Future[tuple[bool, object, observers.Batch]]) -> None:
        self._orphaned -= 1

    def _landed(self, done: asyncio.Future[tuple[bool, object, observers.Batch]]) -> None:
        self._offloaded -= 1
        if not done.cancelled() and done.exception() is None:
            observers.deliver(done.result()[2])

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _run(row: sqlite3.Row) -> RunRecord:
        data = _columns(row)
        for f in _JSON_RUN_FIELDS:
            data[f] = _json(data[f])
        data["cancel_requested"] = bool(data["cancel_requested"])
        caps = data.get("capabilities")
        data["capabilities"] = _json(caps) if caps is not None else None
        return RunRecord.model_validate(data)

    @staticmethod
    def _step(row: sqlite3.Row) -> StepRecord:
        data = _columns(row)
        data["input"] = _json(data["input"])
        for f in ("output", "error", "reserved"):
            if data[f] is not None:
                data[f] = _json(data[f])
        return StepRecord.model_validate(data)

    @staticmethod
    def _updated(run: RunRecord, **changes: Any) -> RunRecord:
        """``run`` (read in this transaction) as its row reads after an UPDATE of
        ``changes``: validated as a read is, without reading it back."""
        return RunRecord.model_validate({**run.__dict__, **changes})

    def _fetch_run(self, db: sqlite3.Connection, run_id: str) -> RunRecord:
        row = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        return self._run(row)

    def _fence(self, db: sqlite3.Connection, run_id: str, epoch: int | None, *,
               journal: bool = False) -> RunRecord:
        """Check the epoch; ``journal`` writes (steps, approvals, audit) also refuse a finished
        run, whose chain ends with its terminal record (DESIGN §7)."""
        run = self._fetch_run(db, run_id)
        if epoch is not None and run.epoch != epoch:
            raise LeaseLost(run_id, epoch)
        if journal and run.state.terminal:
            raise LeaseLost(run_id, -1 if epoch is None else epoch)
        return run

    def _fence_light(self, db: sqlite3.Connection, run_id: str,
                     epoch: int) -> tuple[list[str], tuple[int, str], RunFlags, int]:
        """The journal fence of the hot path, without decoding the whole run: the run's
        ledgers, audit head and flags, and the last seq of its steps (0: none)."""
        row = db.execute("SELECT epoch, state, ledgers, audit_seq, audit_hash, "
                         "cancel_requested, (SELECT MAX(seq) FROM steps WHERE run_id=runs.id) "
                         "FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"run {run_id} not found")
        if row[0] != epoch or RunState(row[1]).terminal:
            raise LeaseLost(run_id, epoch)
        ledgers: list[str] = _json(row[2])
        return ledgers, (row[3], row[4]), RunFlags(row[0], bool(row[5])), row[6] or 0

    def _audit(self, db: sqlite3.Connection, run_id: str, events: Sequence[AuditEvent],
               now: float, head: tuple[int, str]) -> tuple[int, str]:
        """Append to the chain after ``head`` (read from the run row in this transaction) and
        move the head on the run row; returns the new head."""
        rows, moved = self._appended(run_id, events, now, head)
        if rows:
            db.executemany(_AUDIT_INSERT, rows)
            db.execute(_MOVE_HEAD, (*moved, run_id))
        return moved

    def _appended(self, run_id: str, events: Sequence[AuditEvent], now: float,
                  head: tuple[int, str]) -> tuple[list[tuple[object, ...]], tuple[int, str]]:
        """The audit rows of ``events`` after ``head``, and the new head: for a caller that
        writes the run row itself, the head with it."""
        if not events:
            return [], head
        chain = AuditChain(run_id, self.audit_key, *head)
        return self._chained(chain, events, now), (chain.last_seq, chain.last_hash)

    @staticmethod
    def _chained(chain: AuditChain, events: Sequence[AuditEvent],
                 now: float) -> list[tuple[object, ...]]:
        """``events`` appended to ``chain`` (noted for the observers): their audit rows."""
        observers.written(chain.run_id, events)
        stamp = iso_utc(now)
        return [(rec.run_id, rec.seq, rec.time, rec.actor, rec.kind, rec.data_json,
                 rec.prev_hash, rec.hash)
                for rec in (chain.append(ev.kind, ev.data, ev.actor, stamp) for ev in events)]

    def _recover(self, db: sqlite3.Connection, run: RunRecord, rec: Recovery,
                 now: float) -> None:
        """Write a crash recovery: requeued (lease cleared, epoch bumped) or quarantined."""
        db.execute(
            "UPDATE runs SET state=?, lease_owner=NULL, lease_expires_at=NULL, epoch=epoch+1, "
            "crash_count=?, error_code=COALESCE(?, error_code), "
            "error_message=COALESCE(?, error_message), updated_at=? WHERE id=?",
            (str(rec.state), rec.crash_count, rec.error_code, rec.error_message, now, run.id))
        self._audit(db, run.id, rec.events, now, run.audit_head)

    def _set_state(self, db: sqlite3.Connection, run: RunRecord, to: RunState, now: float,
                   error_code: str | None, reason: str, actor: str = "engine") -> AuditEvent:
        check_transition(run.id, run.state, to, error_code)
        return AuditEvent(kind="state.changed", actor=actor,
                          data={"from": str(run.state), "to": str(to), "reason": reason})

    # -- runs ----------------------------------------------------------------------------------
    async def create_run(
        self, run: RunRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        with self._tx() as db:
            if run.idempotency_key:
                row = db.execute(
                    "SELECT * FROM runs WHERE tenant=? AND idempotency_key=?",
                    (run.tenant, run.idempotency_key),
                ).fetchone()
                if row is not None:
                    return self._run(row), False
            return self._insert_run(db, run, audit, ledger), True

    def _insert_run(self, db: sqlite3.Connection, run: RunRecord, audit: Sequence[AuditEvent],
                    ledger: LedgerRecord | None) -> RunRecord:
        """Insert a new run (and its ledger) and start its chain; returns it with its head."""
        rows, head = self._appended(run.id, audit, run.created_at, (0, GENESIS))
        run = run.with_head(head)
        data = run.model_dump()
        for f in _JSON_RUN_FIELDS:
            data[f] = json.dumps(data[f])
        data["state"] = str(run.state)
        data["cancel_requested"] = int(run.cancel_requested)
        if run.capabilities is not None:
            data["capabilities"] = json.dumps(sorted(run.capabilities))
        cols = ", ".join(data)
        db.execute(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(data))})",
                   tuple(data.values()))
        if ledger is not None:
            self._insert_ledger(db, ledger, run.created_at)
        if rows:
            db.executemany(_AUDIT_INSERT, rows)
        return run

    @staticmethod
    def _insert_ledger(db: sqlite3.Connection, ledger: LedgerRecord, now: float) -> None:
        db.execute("INSERT INTO ledgers(id, limits, used, exhausted, updated_at) "
                   "VALUES (?,?,?,?,?)", (ledger.id, json.dumps(ledger.limits),
                                          json.dumps(ledger.used), ledger.exhausted, now))

    async def get_run(self, run_id: str, tenant: str | None = None) -> RunRecord:
        run = self._fetch_run(self._conn, run_id)
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
        rows = self._newest("runs", {"tenant": tenant, "state": state, "root_id": root_id,
                                     "parent_id": parent_id}, limit)
        return [self._run(r) for r in rows]

    def _newest(self, table: str, filters: dict[str, object], limit: int) -> list[sqlite3.Row]:
        """Rows of ``table`` matching the non-None filters, newest first. With a run's or a
        tree's id, only its index is searched (``+col``: no index for the other terms);
        without statistics the planner would pick a state's or tenant's, and read every
        queued run to find a tree's."""
        given = {col: str(val) for col, val in filters.items() if val is not None}
        narrow = not _NARROW.isdisjoint(given)
        where = [f"+{col}=?" if narrow and col not in _NARROW else f"{col}=?" for col in given]
        args = list(given.values())
        sql = f"SELECT * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return self._conn.execute(sql, (*args, limit)).fetchall()

    async def claim_run(
        self, run_id: str, owner: str, lease_seconds: float, now: float, *, steal: bool = False,
        expected_epoch: int | None = None, max_attempts: int | None = None,
    ) -> RunRecord | None:
        with self._tx() as db:
            run = self._fetch_run(db, run_id)
            plan = plan_claim(run, owner, now, steal=steal, expected_epoch=expected_epoch,
                              max_attempts=max_attempts)
            return self._claim(db, run, plan, owner, lease_seconds, now)

    def _claim(self, db: sqlite3.Connection, run: RunRecord, plan: ClaimPlan | None,
               owner: str, lease_seconds: float, now: float) -> RunRecord | None:
        if plan is None:
            return None
        if plan.quarantine is not None:
            self._recover(db, run, plan.quarantine, now)
            return None
        lease_expires_at, epoch = now + lease_seconds, run.epoch + 1
        rows, (seq, digest) = self._appended(run.id, plan.events, now, run.audit_head)
        db.execute(
            "UPDATE runs SET state=?, lease_owner=?, lease_expires_at=?, epoch=?, updated_at=?, "
            "crash_count=?, audit_seq=?, audit_hash=? WHERE id=?",
            (str(RunState.RUNNING), owner, lease_expires_at, epoch, now, plan.crash_count,
             seq, digest, run.id),
        )
        if rows:
            db.executemany(_AUDIT_INSERT, rows)
        return self._updated(run, state=RunState.RUNNING, lease_owner=owner,
                             lease_expires_at=lease_expires_at, epoch=epoch, updated_at=now,
                             crash_count=plan.crash_count, audit_seq=seq, audit_hash=digest)

    async def claim_next(self, owner: str, lease_seconds: float, now: float) -> RunRecord | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM runs WHERE state=? ORDER BY created_at, id LIMIT 1",
                (str(RunState.QUEUED),),
            ).fetchone()
            if row is None:
                return None
            run = self._run(row)
            return self._claim(db, run, plan_claim(run, owner, now), owner, lease_seconds, now)

    async def renew_lease(
        self, run_id: str, owner: str, epoch: int, lease_seconds: float, now: float
    ) -> None:
        with self._tx() as db:
            run = self._fence(db, run_id, epoch)
            if run.state != RunState.RUNNING or run.lease_owner != owner:
                raise LeaseLost(run_id, epoch)
            db.execute("UPDATE runs SET lease_expires_at=? WHERE id=?",
                       (now + lease_seconds, run_id))

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
        """One transaction: ``steps`` as :meth:`save_steps` writes them, then the move."""
        if steps and epoch is None:
            raise ValueError("journal writes need the lease's epoch")
        moved, refused, over = await self._move(
            run_id, to, now, epoch, steps, _Move(output, output_type, error_code, error_message,
                                                 usage, audit))
        if refused is not None:
            await self._exhaust(refused)
            raise refused
        if over is not None:
            raise over
        assert moved is not None
        return moved

    @_unit
    async def _move(
        self, run_id: str, to: RunState, now: float, epoch: int | None,
        steps: Sequence[StepWrite], move: _Move,
    ) -> tuple[RunRecord | None, ledger_logic.BudgetExceeded | None,
               ledger_logic.BudgetExceeded | None]:
        """The unit of :meth:`transition`: the journal writes (:meth:`_journal_steps`, in
        this transaction), then, unless one was refused or overspent, the move."""
        with self._tx() as db:
            if steps:
                assert epoch is not None
                journal = _nested(SQLiteStore._journal_steps)
                _, _, refused, over = await journal(self, steps, epoch, False)
                if refused is not None or over is not None:
                    return None, refused, over  # the writes before it are committed
            run = self._fence(db, run_id, epoch)
            return self._transition(db, run, to, now, epoch=epoch, output=move.output,
                                    output_type=move.output_type, error_code=move.error_code,
                                    error_message=move.error_message, usage=move.usage,
                                    audit=move.audit), None, None

    def _transition(
        self, db: sqlite3.Connection, run: RunRecord, to: RunState, now: float, *,
        epoch: int | None, output: str | None = None, output_type: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None, usage: dict[str, Any] | None = None,
        audit: Sequence[AuditEvent] = (),
    ) -> RunRecord:
        """The body of :meth:`transition` for a run fenced in this transaction."""
        if epoch is None and run.state == RunState.RUNNING and to != RunState.QUEUED:
            raise LeaseLost(run.id, -1)
        reason = error_message or ("finished" if to.terminal else str(to))
        event = self._set_state(db, run, to, now, error_code, reason)
        event.data.update({"error_code": error_code} if error_code else {})
        keep_lease = to == RunState.RUNNING
        epoch_after = run.epoch if keep_lease or epoch is not None else run.epoch + 1
        usage_json = json.dumps(usage) if usage is not None else None
        db.execute(
            "UPDATE runs SET state=?, output=COALESCE(?, output), "
            "output_type=COALESCE(?, output_type), error_code=?, "
            "error_message=?, usage=COALESCE(?, usage), updated_at=?, epoch=?, "
            "lease_owner=CASE WHEN ? THEN lease_owner END, "
            "lease_expires_at=CASE WHEN ? THEN lease_expires_at END WHERE id=?",
            (str(to), output, output_type, error_code, error_message, usage_json, now,
             epoch_after, keep_lease, keep_lease, run.id),
        )
        if to.terminal:
            self._close_started_steps(db, run.id, to, error_code, now)
        seq, digest = self._audit(db, run.id, [*audit, event], now, run.audit_head)
        return self._updated(
            run, state=to, output=run.output if output is None else output,
            output_type=run.output_type if output_type is None else output_type,
            error_code=error_code, error_message=error_message,
            usage=run.usage if usage_json is None else _json(usage_json), updated_at=float(now),
            epoch=epoch_after, lease_owner=run.lease_owner if keep_lease else None,
            lease_expires_at=run.lease_expires_at if keep_lease else None,
            audit_seq=seq, audit_hash=digest)

    @staticmethod
    def _close_started_steps(db: sqlite3.Connection, run_id: str, to: RunState,
                             error_code: str | None, now: float) -> None:
        """A terminal run has no step in flight: one still ``started`` (a cancelled approval
        wait, a crash the runner could not record) is failed in the same transaction."""
        error = json.dumps(unfinished_step_error(to, error_code))
        db.execute("UPDATE steps SET status=?, error=COALESCE(error, ?), finished_at=? "
                   "WHERE run_id=? AND status=?",
                   (str(StepStatus.FAILED), error, now, run_id, str(StepStatus.STARTED)))

    async def request_cancel(self, run_id: str, tenant: str | None = None) -> RunRecord:
        """Decided inside one transaction: a run that finishes meanwhile is left as it is
        (nothing is appended after its terminal record)."""
        with self._tx() as db:
            run = self._fetch_run(db, run_id)
            if tenant is not None and run.tenant != tenant:
                raise NotFound(f"run {run_id} not found")
            if run.state.terminal:
                return run
            if run.state != RunState.RUNNING:
                return self._transition(db, run, RunState.CANCELLED, run.updated_at,
                                        epoch=None, error_code="cancelled",
                                        error_message="cancelled by user")
            db.execute("UPDATE runs SET cancel_requested=1 WHERE id=?", (run_id,))
            self._audit(db, run_id, [AuditEvent(kind="cancel.requested", actor="user")],
                        run.updated_at, run.audit_head)
            return self._fetch_run(db, run_id)

    @_composite
    async def requeue_expired(self, now: float, *, max_attempts: int | None = None) -> list[str]:
        done = []
        for run_id in await self._expired(now):
            if await self._requeue(run_id, now, max_attempts):
                done.append(run_id)
        return done

    @_unit
    async def _expired(self, now: float) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT id FROM runs WHERE state=? AND lease_expires_at < ?",
            (str(RunState.RUNNING), now)).fetchall()]

    @_unit
    async def _requeue(self, run_id: str, now: float, max_attempts: int | None) -> bool:
        """Recover one run whose lease expired (re-checked here); True when requeued."""
        with self._tx() as db:
            run = self._fetch_run(db, run_id)
            if run.state != RunState.RUNNING or (run.lease_expires_at or 0) >= now:
                return False
            rec = recover_run(run, f"lease of {run.lease_owner} expired", max_attempts)
            self._recover(db, run, rec, now)
            return not rec.quarantined

    # -- steps and audit -------------------------------------------------------------------------
    @_composite
    async def save_step(
        self, step: StepRecord, epoch: int, audit: Sequence[AuditEvent] = (),
        *, reserve: dict[str, float] | None = None, settle: dict[str, float] | None = None,
    ) -> RunFlags:
        """Journal a step; ``reserve`` debits the run's ledgers first (once per step, atomically
        with the journal write), ``settle`` corrects them with actual usage."""
        done = await self.save_steps([StepWrite(step, audit, reserve, settle)], epoch)
        assert done.flags is not None
        return done.flags

    @_composite
    async def save_steps(
        self, writes: Sequence[StepWrite], epoch: int, *, unless_cancelled: bool = False,
    ) -> Journaled:
        """Every write in one transaction (see :meth:`Store.save_steps`)."""
        flags, skipped, refused, over = await self._journal_steps(writes, epoch,
                                                                  unless_cancelled)
        if refused is not None:
            await self._exhaust(refused)
            raise refused
        if over is not None:
            raise over
        return Journaled(flags, skipped)

    @_unit
    async def _journal_steps(
        self, writes: Sequence[StepWrite], epoch: int, unless_cancelled: bool,
    ) -> tuple[RunFlags, bool, ledger_logic.BudgetExceeded | None,
               ledger_logic.BudgetExceeded | None]:
        """The journal writes of :meth:`save_steps` in one transaction: the run's flags, and
        whether the last was skipped for a cancel request; what was refused (nothing written
        for that step, nor after it) or overspent (written, the ledger marked exhausted, and
        nothing after it). The ledgers are read once and written once, and the chain head
        moved once on the run row, whatever the number of writes."""
        with self._tx() as db:
            run_id = writes[0].step.run_id
            ledger_ids, head, flags, last_seq = self._fence_light(db, run_id, epoch)
            tx = _JournalTx(AuditChain(run_id, self.audit_key, *head), last_seq,
                            lambda: self._ledgers(db, ledger_ids))
            skipped = False
            refused = over = None
            for index, write in enumerate(writes):
                if unless_cancelled and flags.cancel_requested and index == len(writes) - 1:
                    skipped = True
                    break
                refused, over = self._journal_one(db, write, tx)
                if refused is not None or over is not None:
                    break
            self._journaled(db, tx)
        return flags, skipped, refused, over

    @staticmethod
    def _journaled(db: sqlite3.Connection, tx: _JournalTx) -> None:
        """The end of a journal transaction's writes: the ledgers as debited, the audit
        records, the chain head on the run row."""
        for ledger in tx.read() if tx.debited else ():
            db.execute("UPDATE ledgers SET used=? WHERE id=?",
                       (json.dumps(ledger.used), ledger.id))
        if tx.audit:
            db.executemany(_AUDIT_INSERT, tx.audit)
            db.execute(_MOVE_HEAD, (tx.chain.last_seq, tx.chain.last_hash, tx.chain.run_id))

    def _journal_one(
        self, db: sqlite3.Connection, write: StepWrite, tx: _JournalTx,
    ) -> tuple[ledger_logic.BudgetExceeded | None, ledger_logic.BudgetExceeded | None]:
        """One journal write inside the fenced transaction (``tx``: what the writes before it
        left: the chain head, the ledgers as debited so far)."""
        step, reserve, settle = write.step, write.reserve, write.settle
        over: ledger_logic.BudgetExceeded | None = None
        if reserve:
            # A row of this step may hold what it reserved before a crash: not twice. No step
            # past the last seq with a row (at the fence, or written since) has one.
            row = db.execute("SELECT reserved FROM steps WHERE run_id=? AND seq=?",
                             (step.run_id, step.seq)).fetchone() if (
                step.seq <= tx.last_seq) else None
            if row is not None and row[0] is not None:
                step.reserved = _json(row[0])
            else:
                ledgers = tx.read()
                try:
                    ledger_logic.check_reserve(ledgers, reserve)
                except ledger_logic.BudgetExceeded as exc:
                    return exc, None
                tx.debit(reserve)
                step.reserved = dict(reserve)
        if settle:
            ledgers = tx.read()
            tx.debit(settle)
            over = ledger_logic.overspent(ledgers, settle)
            if over is not None:  # the usage stays recorded; the tree stops
                db.execute("UPDATE ledgers SET exhausted=COALESCE(exhausted, ?) "
                           "WHERE id=?", (over.resource, over.ledger_id))
        self._write_step(db, step)
        tx.last_seq = max(tx.last_seq, step.seq)
        if write.audit:
            tx.audit += self._chained(tx.chain, write.audit, step.finished_at or step.started_at)
        return None, over

    @_unit
    async def _exhaust(self, refused: ledger_logic.BudgetExceeded) -> None:
        with self._tx() as db:
            db.execute("UPDATE ledgers SET exhausted=COALESCE(exhausted, ?) WHERE id=?",
                       (refused.resource, refused.ledger_id))

    def _write_step(self, db: sqlite3.Connection, step: StepRecord) -> None:
        db.execute(
            "INSERT INTO steps(run_id, seq, kind, name, status, input, output, error, "
            "idempotency_key, attempts, started_at, finished_at, reserved) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(run_id, seq) DO UPDATE SET "
            "status=excluded.status, input=excluded.input, output=excluded.output, "
            "error=excluded.error, attempts=excluded.attempts, "
            "finished_at=excluded.finished_at, reserved=COALESCE(excluded.reserved, reserved)",
            (step.run_id, step.seq, str(step.kind), step.name, str(step.status),
             json.dumps(step.input), json.dumps(step.output) if step.output is not None
             else None, json.dumps(step.error) if step.error is not None else None,
             step.idempotency_key, step.attempts, step.started_at, step.finished_at,
             json.dumps(step.reserved) if step.reserved is not None else None),
        )

    def _ledgers(self, db: sqlite3.Connection, ids: Sequence[str]) -> list[
            ledger_logic.LedgerState]:
        out = []
        for lid in ids:
            row = db.execute("SELECT id, limits, used, exhausted FROM ledgers WHERE id=?",
                             (lid,)).fetchone()
            if row is not None:
                out.append(ledger_logic.LedgerState(id=row[0], limits=_json(row[1]),
                                                    used=_json(row[2]), exhausted=row[3]))
        return out

    async def get_ledger(self, ledger_id: str) -> LedgerRecord:
        found = self._ledgers(self._conn, [ledger_id])
        if not found:
            raise NotFound(f"ledger {ledger_id} not found")
        state = found[0]
        return LedgerRecord(id=state.id, limits=state.limits, used=state.used,
                            exhausted=state.exhausted)

    async def list_steps(self, run_id: str) -> list[StepRecord]:
        rows = self._conn.execute("SELECT * FROM steps WHERE run_id=? ORDER BY seq",
                                  (run_id,)).fetchall()
        return [self._step(r) for r in rows]

    async def append_audit(
        self, run_id: str, events: Sequence[AuditEvent], now: float, *, epoch: int | None = None
    ) -> None:
        with self._tx() as db:
            run = self._fence(db, run_id, epoch, journal=True)
            self._audit(db, run_id, events, now, run.audit_head)

    async def list_audit(self, run_id: str, after_seq: int = 0) -> list[AuditRecord]:
        rows = self._conn.execute(
            "SELECT * FROM audit WHERE run_id=? AND seq>? ORDER BY seq", (run_id, after_seq)
        ).fetchall()
        return [AuditRecord.from_dict({**dict(r), "data": json.loads(r["data"])}) for r in rows]

    # -- approvals -----------------------------------------------------------------------------
    @staticmethod
    def _approval(row: sqlite3.Row) -> ApprovalRecord:
        data = dict(row)
        data["arguments"] = json.loads(data["arguments"])
        return ApprovalRecord.model_validate(data)

    async def create_approval(
        self, approval: ApprovalRecord, epoch: int, audit: Sequence[AuditEvent] = ()
    ) -> ApprovalRecord:
        """Record a pending approval for a step; the same step never gets two."""
        with self._tx() as db:
            run = self._fence(db, approval.run_id, epoch, journal=True)
            row = db.execute("SELECT * FROM approvals WHERE run_id=? AND step=?",
                             (approval.run_id, approval.step)).fetchone()
            if row is not None:
                return self._approval(row)
            data = approval.model_dump()
            data["arguments"] = json.dumps(approval.arguments)
            data["status"] = str(approval.status)
            cols = ", ".join(data)
            db.execute(f"INSERT INTO approvals ({cols}) VALUES ({', '.join('?' * len(data))})",
                       tuple(data.values()))
            self._audit(db, approval.run_id, audit, approval.created_at, run.audit_head)
        return approval

    async def get_approval(self, approval_id: str, tenant: str | None = None) -> ApprovalRecord:
        row = self._conn.execute("SELECT * FROM approvals WHERE id=?", (approval_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"approval {approval_id} not found")
        return self._approval(row)

    async def get_step_approval(self, run_id: str, step: int) -> ApprovalRecord | None:
        row = self._conn.execute("SELECT * FROM approvals WHERE run_id=? AND step=?",
                                 (run_id, step)).fetchone()
        return self._approval(row) if row is not None else None

    async def list_approvals(
        self, *, tenant: str | None = None, status: ApprovalStatus | None = None,
        run_id: str | None = None, limit: int = 100,
    ) -> list[ApprovalRecord]:
        rows = self._newest("approvals", {"tenant": tenant, "status": status,
                                          "run_id": run_id}, limit)
        return [self._approval(r) for r in rows]

    async def decide_approval(
        self, approval_id: str, *, approve: bool, by: str, comment: str | None, now: float,
        tenant: str | None = None,
    ) -> ApprovalRecord:
        """Approve or reject a pending approval and wake its run, in one transaction."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM approvals WHERE id=?", (approval_id,)).fetchone()
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise NotFound(f"approval {approval_id} not found")
            approval = self._approval(row)
            if approval.status != ApprovalStatus.PENDING:
                raise ApprovalConflict(f"approval {approval_id} is already {approval.status}")
            run = self._fetch_run(db, approval.run_id)
            if run.state.terminal:
                raise ApprovalConflict(closed_run_decision(approval_id, run))
            status = ApprovalStatus.APPROVED if approve else ApprovalStatus.REJECTED
            db.execute("UPDATE approvals SET status=?, decided_by=?, decided_at=?, comment=? "
                       "WHERE id=?", (str(status), by, now, comment, approval_id))
            events = [AuditEvent(kind="approval.decided", actor=f"user:{by}", data={
                "approval_id": approval_id, "step": approval.step, "action": approval.action,
                "decision": str(status), "comment": comment, "decided_at": iso_utc(now)})]
            self._wake(db, run, now, events, "approval decided")
            return approval.model_copy(update={"status": status, "decided_by": by,
                                               "decided_at": now, "comment": comment})

    def _wake(self, db: sqlite3.Connection, run: RunRecord, now: float,
              events: list[AuditEvent], why: str) -> None:
        """Requeue a waiting run and audit the decision; a finished run's chain is closed, so
        a decision on it (an approval expiring after a cancel) is only kept on the approval."""
        if run.state.terminal:
            return
        if run.state == RunState.WAITING:
            events.append(self._set_state(db, run, RunState.QUEUED, now, None, why))
            db.execute("UPDATE runs SET state=?, updated_at=? WHERE id=?",
                       (str(RunState.QUEUED), now, run.id))
        self._audit(db, run.id, events, now, run.audit_head)

    @_composite
    async def expire_approvals(self, now: float) -> list[ApprovalRecord]:
        """Pending approvals past their expiry: marked expired; the run is woken to apply its
        policy (a ``deny`` fails it at its next turn)."""
        out = []
        for approval_id in await self._expiring(now):
            expired = await self._expire(approval_id, now)
            if expired is not None:
                out.append(expired)
        return out

    @_unit
    async def _expiring(self, now: float) -> list[str]:
        return [r[0] for r in self._conn.execute(
            "SELECT id FROM approvals WHERE status=? AND expires_at IS NOT NULL AND "
            "expires_at < ?", (str(ApprovalStatus.PENDING), now)).fetchall()]

    @_unit
    async def _expire(self, approval_id: str, now: float) -> ApprovalRecord | None:
        """Expire one approval if it is still pending (re-checked here) and wake its run."""
        with self._tx() as db:
            approval = self._approval(db.execute("SELECT * FROM approvals WHERE id=?",
                                                 (approval_id,)).fetchone())
            if approval.status != ApprovalStatus.PENDING:
                return None
            db.execute("UPDATE approvals SET status=?, decided_by=?, decided_at=? "
                       "WHERE id=?", (str(ApprovalStatus.EXPIRED), "system:expiry", now,
                                      approval_id))
            self._wake(db, self._fetch_run(db, approval.run_id), now, [AuditEvent(
                kind="approval.expired", actor="system:expiry",
                data={"approval_id": approval_id, "policy": approval.on_expiry})],
                "approval expired")
            return approval.model_copy(update={"status": ApprovalStatus.EXPIRED})

    # -- API keys ------------------------------------------------------------------------------
    async def create_api_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        with self._tx() as db:
            db.execute("INSERT INTO api_keys(id, tenant, role, key_hash, name, created_at, "
                       "revoked_at) VALUES (?,?,?,?,?,?,?)",
                       (key.id, key.tenant, key.role, key.key_hash, key.name, key.created_at,
                        key.revoked_at))
        return key

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        row = self._conn.execute("SELECT * FROM api_keys WHERE key_hash=? AND revoked_at IS "
                                 "NULL", (key_hash,)).fetchone()
        return ApiKeyRecord.model_validate(dict(row)) if row is not None else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        sql, args = "SELECT * FROM api_keys", cast(tuple[str, ...], ())
        if tenant is not None:
            sql, args = sql + " WHERE tenant=?", (tenant,)
        rows = self._conn.execute(sql + " ORDER BY created_at", args).fetchall()
        return [ApiKeyRecord.model_validate(dict(r)) for r in rows]

    # -- registered workflows ------------------------------------------------------------------
    async def put_workflow(self, workflow: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        # BEGIN IMMEDIATE serializes writers across processes: the max read here is final.
        with self._tx() as db:
            row = db.execute("SELECT * FROM workflows WHERE tenant=? AND name=? "
                             "ORDER BY version DESC LIMIT 1",
                             (workflow.tenant, workflow.name)).fetchone()
            if row is not None and row["content_hash"] == workflow.content_hash:
                return WorkflowRecord.model_validate(dict(row)), False
            stored = workflow.model_copy(update={"version": (row["version"] if row else 0) + 1})
            db.execute("INSERT INTO workflows(tenant, name, version, content_hash, author, "
                       "created_at, format, source) VALUES (?,?,?,?,?,?,?,?)",
                       (stored.tenant, stored.name, stored.version, stored.content_hash,
                        stored.author, stored.created_at, stored.format, stored.source))
        return stored, True

    async def get_workflow(self, tenant: str, name: str,
                           version: int | None = None) -> WorkflowRecord:
        sql = "SELECT * FROM workflows WHERE tenant=? AND name=?"
        args: tuple[object, ...] = (tenant, name)
        if version is not None:
            sql, args = sql + " AND version=?", (*args, version)
        row = self._conn.execute(sql + " ORDER BY version DESC LIMIT 1", args).fetchone()
        if row is None:
            raise NotFound(workflow_not_found(name, version))
        return WorkflowRecord.model_validate(dict(row))

    async def list_workflows(self, tenant: str) -> list[WorkflowRecord]:
        rows = self._conn.execute(
            "SELECT w.* FROM workflows w JOIN (SELECT name, MAX(version) AS v FROM workflows "
            "WHERE tenant=? GROUP BY name) latest ON w.name=latest.name AND w.version=latest.v "
            "WHERE w.tenant=? ORDER BY w.name", (tenant, tenant)).fetchall()
        return [WorkflowRecord.model_validate(dict(r)) for r in rows]

    async def list_workflow_versions(self, tenant: str, name: str) -> list[WorkflowRecord]:
        rows = self._conn.execute("SELECT * FROM workflows WHERE tenant=? AND name=? "
                                  "ORDER BY version DESC", (tenant, name)).fetchall()
        return [WorkflowRecord.model_validate(dict(r)) for r in rows]

    # -- threads ---------------------------------------------------------------------------------
    @staticmethod
    def _thread(row: sqlite3.Row) -> ThreadRecord:
        data = dict(row)
        for f in _JSON_THREAD_FIELDS:
            data[f] = json.loads(data[f])
        return ThreadRecord.model_validate(data)

    def _fetch_thread(self, db: sqlite3.Connection, thread_id: str, tenant: str | None,
                      deleted: bool = False) -> ThreadRecord:
        row = db.execute("SELECT * FROM threads WHERE id=?", (thread_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant) or (
                row["deleted_at"] is not None and not deleted):
            raise NotFound(thread_not_found(thread_id))
        return self._thread(row)

    def _thread_audit(self, db: sqlite3.Connection, thread_id: str,
                      events: Sequence[AuditEvent], now: float) -> None:
        """Append to the thread's own chain (callers hold the write lock: BEGIN IMMEDIATE)."""
        if not events:
            return
        row = db.execute("SELECT seq, hash FROM thread_audit WHERE thread_id=? "
                         "ORDER BY seq DESC LIMIT 1", (thread_id,)).fetchone()
        chain = AuditChain(thread_id, self.audit_key, *((row[0], row[1]) if row else
                                                        (0, GENESIS)))
        stamp = iso_utc(now)
        db.executemany(
            "INSERT INTO thread_audit(thread_id, seq, time, actor, kind, data, prev_hash, hash) "
            "VALUES (?,?,?,?,?,?,?,?)",
            [(rec.run_id, rec.seq, rec.time, rec.actor, rec.kind,
              json.dumps(rec.data, sort_keys=True), rec.prev_hash, rec.hash)
             for rec in (chain.append(ev.kind, ev.data, ev.actor, stamp) for ev in events)])

    def _insert_thread(self, db: sqlite3.Connection, thread: ThreadRecord,
                       audit: Sequence[AuditEvent], ledger: LedgerRecord | None) -> None:
        data = thread.model_dump()
        for f in _JSON_THREAD_FIELDS:
            data[f] = json.dumps(data[f])
        cols = ", ".join(data)
        db.execute(f"INSERT INTO threads ({cols}) VALUES ({', '.join('?' * len(data))})",
                   tuple(data.values()))
        if ledger is not None:
            self._insert_ledger(db, ledger, thread.created_at)
        self._thread_audit(db, thread.id, audit, thread.created_at)

    async def create_thread(
        self, thread: ThreadRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> ThreadRecord:
        with self._tx() as db:
            self._insert_thread(db, thread, audit, ledger)
        return thread

    async def get_thread(self, thread_id: str, tenant: str | None = None, *,
                         deleted: bool = False) -> ThreadRecord:
        return self._fetch_thread(self._conn, thread_id, tenant, deleted)

    async def list_threads(self, *, tenant: str | None = None,
                           limit: int = 100) -> list[ThreadRecord]:
        sql, args = "SELECT * FROM threads WHERE deleted_at IS NULL", cast(tuple[Any, ...], ())
        if tenant is not None:
            sql, args = sql + " AND tenant=?", (tenant,)
        rows = self._conn.execute(sql + " ORDER BY updated_at DESC, id DESC LIMIT ?",
                                  (*args, limit)).fetchall()
        return [self._thread(r) for r in rows]

    def _turns(self, db: sqlite3.Connection, thread_id: str) -> list[RunRecord]:
        rows = db.execute("SELECT * FROM runs WHERE thread_id=? ORDER BY turn",
                          (thread_id,)).fetchall()
        return [self._run(r) for r in rows]

    async def create_turn(
        self, run: RunRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        thread_id = run.thread_id or ""
        with self._tx() as db:  # BEGIN IMMEDIATE: no other writer until the turn is in
            if run.idempotency_key:
                row = db.execute("SELECT * FROM runs WHERE tenant=? AND idempotency_key=?",
                                 (run.tenant, run.idempotency_key)).fetchone()
                if row is not None:
                    return self._run(row), False
            self._fetch_thread(db, thread_id, run.tenant)
            row = db.execute("SELECT * FROM runs WHERE thread_id=? ORDER BY turn DESC LIMIT 1",
                             (thread_id,)).fetchone()
            run = run.model_copy(update={"turn": next_turn(
                thread_id, self._run(row) if row is not None else None)})
            created = self._insert_run(db, run, audit, ledger)
            db.execute("UPDATE threads SET updated_at=? WHERE id=?", (run.created_at, thread_id))
            self._thread_audit(db, thread_id, [turn_created(created)], run.created_at)
        return created, True

    async def list_turns(self, thread_id: str) -> list[RunRecord]:
        return self._turns(self._conn, thread_id)

    async def fork_thread(self, thread: ThreadRecord, copies: Sequence[TurnCopy],
                          audit: Sequence[AuditEvent] = (),
                          ledger: LedgerRecord | None = None) -> ThreadRecord:
        with self._tx() as db:
            if thread.forked_from is not None:
                self._fetch_thread(db, thread.forked_from, thread.tenant)
            self._insert_thread(db, thread, audit, ledger)
            for copy in copies:
                self._insert_run(db, copy.run, copy.audit, None)
                for step in copy.steps:
                    self._write_step(db, step)
        return thread

    async def delete_thread(self, thread_id: str, now: float, *, tenant: str | None = None,
                            actor: str = "user") -> ThreadRecord:
        with self._tx() as db:
            thread = self._fetch_thread(db, thread_id, tenant)
            turns = self._turns(db, thread_id)
            check_deletable(thread_id, turns)
            erased = []
            for turn in turns:
                for row in db.execute("SELECT id, audit_seq, audit_hash FROM runs WHERE "
                                      "root_id=? ORDER BY created_at, id", (turn.id,)):
                    erased.append(Erased(row[0], turn.turn if row[0] == turn.id else None,
                                         row[1], row[2]))
            for e in erased:
                db.execute("DELETE FROM audit WHERE run_id=?", (e.run_id,))
                db.execute("DELETE FROM steps WHERE run_id=?", (e.run_id,))
                db.execute("UPDATE approvals SET arguments='{}', comment=NULL WHERE run_id=?",
                           (e.run_id,))
                db.execute("UPDATE runs SET input=?, output=NULL, error_message=NULL "
                           "WHERE id=?", (ERASED, e.run_id))
            db.execute("UPDATE threads SET title=?, metadata='{}', deleted_at=?, updated_at=? "
                       "WHERE id=?", (ERASED, now, now, thread_id))
            self._thread_audit(db, thread_id, [thread_deleted(erased, actor)], now)
        return thread.model_copy(update={"title": ERASED, "metadata": {},
                                         "deleted_at": now, "updated_at": now})

    async def list_thread_audit(self, thread_id: str, after_seq: int = 0) -> list[AuditRecord]:
        rows = self._conn.execute(
            "SELECT * FROM thread_audit WHERE thread_id=? AND seq>? ORDER BY seq",
            (thread_id, after_seq)).fetchall()
        return [AuditRecord.from_dict({**dict(r), "run_id": r["thread_id"],
                                       "data": json.loads(r["data"])}) for r in rows]

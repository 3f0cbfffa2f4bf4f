"""Dedupe a tool's external side effect by the step's idempotency key.

The engine hands every tool call a key that is identical on every retry and after a crash
(DESIGN §4), which makes it *at-least-once*. A tool whose side effect must happen once (post a
message, send an email, charge a card) wraps that effect in :meth:`IdempotencyLedger.once`:

* a key that completed before returns its stored result, without running anything;
* a key being run right now by another task, thread or process makes the caller wait for that
  result (and raise :class:`IdempotencyInProgress` if it does not come in ``wait_timeout``);
* a run that raised is forgotten, so the engine's retry runs it again;
* a claim left behind by a crashed process expires after ``stale_after`` seconds.

State lives in SQLite (``ALPACA_IDEMPOTENCY_DB``, default ``./alpaca-idempotency.db``, WAL).
The claim is taken in a ``BEGIN IMMEDIATE`` transaction, which serialises writers across
processes, so two callers can never both believe they own a key.

Limits: if the process dies after the effect happened but before the result was stored, the
claim expires and the effect can happen again. Results are stored as JSON, so ``fn`` must
return a JSON value; first calls and replays both return its JSON round trip.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from ..sqlite_wal import enable_wal

__all__ = ["DB_ENV", "IdempotencyInProgress", "IdempotencyLedger"]

T = TypeVar("T")
DB_ENV = "ALPACA_IDEMPOTENCY_DB"
DEFAULT_PATH = "./alpaca-idempotency.db"

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('in_progress', 'done')),
    owner TEXT,
    result TEXT,
    started_at REAL NOT NULL,
    finished_at REAL
)
"""


class IdempotencyInProgress(RuntimeError):
    """Another caller holds the key and did not finish within the wait timeout."""

    transient = True  # the holder may finish or die; trying again later is right


class IdempotencyLedger:
    """A SQLite table of keys whose effect is done (with its result) or in progress."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stale_after: float = 300.0,
        wait_timeout: float = 30.0,
        poll_interval: float = 0.05,
    ) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            enable_wal(conn)
            conn.execute(_SCHEMA)

    @classmethod
    def from_env(cls) -> IdempotencyLedger:
        return cls(os.environ.get(DB_ENV) or DEFAULT_PATH)

    def _connect(self) -> sqlite3.Connection:
        # One connection per operation: safe from any thread, and nothing to close on fork.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    # ------------------------------------------------------------------ primitives (sync)

    def _claim(self, key: str, owner: str) -> tuple[Literal["done", "claimed", "busy"], Any]:
        now = time.time()
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT state, result, started_at FROM idempotency WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO idempotency (key, state, owner, started_at) "
                    "VALUES (?, 'in_progress', ?, ?)",
                    (key, owner, now),
                )
                conn.execute("COMMIT")
                return "claimed", None
            state, result, started_at = row
            if state == "done":
                conn.execute("COMMIT")
                return "done", json.loads(result)
            if now - float(started_at) > self.stale_after:
                log.warning("idempotency key %r: taking over a stale claim", key)
                conn.execute(
                    "UPDATE idempotency SET owner = ?, started_at = ? WHERE key = ?",
                    (owner, now, key),
                )
                conn.execute("COMMIT")
                return "claimed", None
            conn.execute("COMMIT")
            return "busy", None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def _finish(self, key: str, owner: str, encoded: str) -> None:
        with closing(self._connect()) as conn:
            cur = conn.execute(
                "UPDATE idempotency SET state = 'done', result = ?, finished_at = ? "
                "WHERE key = ? AND owner = ?",
                (encoded, time.time(), key, owner),
            )
            if cur.rowcount == 0:
                log.warning("idempotency key %r: claim was lost before the result was stored", key)
                conn.execute(
                    "INSERT INTO idempotency (key, state, owner, result, started_at, finished_at)"
                    " VALUES (?, 'done', ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
                    " state = 'done', owner = excluded.owner, result = excluded.result,"
                    " finished_at = excluded.finished_at",
                    (key, owner, encoded, time.time(), time.time()),
                )

    def _release(self, key: str, owner: str) -> None:
        with closing(self._connect()) as conn:
            conn.execute(
                "DELETE FROM idempotency WHERE key = ? AND owner = ? AND state = 'in_progress'",
                (key, owner),
            )

    # ------------------------------------------------------------------ public API

    async def once(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` once per ``key``; later calls get the stored result (a JSON value)."""
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait_timeout
        delay = self.poll_interval
        while True:
            outcome, stored = await asyncio.to_thread(self._claim, key, owner)
            if outcome == "done":
                return cast(T, stored)
            if outcome == "claimed":
                break
            if time.monotonic() >= deadline:
                raise IdempotencyInProgress(
                    f"idempotency key {key!r} is being run by another caller; try again later"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        try:
            result = await fn()
            encoded = json.dumps(result, sort_keys=True)
        except BaseException:
            # Synchronous on purpose: it must also run when this task is being cancelled.
            self._release(key, owner)
            raise
        await asyncio.to_thread(self._finish, key, owner, encoded)
        return cast(T, json.loads(encoded))

    def status(self, key: str) -> Literal["done", "in_progress"] | None:
        """Where ``key`` stands: done, in progress, or never seen (also after a failure)."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT state FROM idempotency WHERE key = ?", (key,)).fetchone()
        return None if row is None else cast(Literal["done", "in_progress"], row[0])

    def result(self, key: str) -> Any:
        """The stored result of a done key, else None."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT result FROM idempotency WHERE key = ? AND state = 'done'", (key,)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def forget(self, key: str) -> bool:
        """Drop ``key`` so its effect may run again (an operator's deliberate re-send)."""
        with closing(self._connect()) as conn:
            return conn.execute("DELETE FROM idempotency WHERE key = ?", (key,)).rowcount > 0

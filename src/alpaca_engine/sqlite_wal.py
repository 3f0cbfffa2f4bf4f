"""Switching a SQLite file to WAL while other connections may be opening it too."""

from __future__ import annotations

import sqlite3
import time


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY (``database is locked``), whatever its extended code."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY


def enable_wal(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Put the file in WAL mode (it persists: a no-op once any connection did it).

    The switch needs the file to itself, and SQLite answers it with SQLITE_BUSY at once,
    without waiting through the busy timeout, while another connection is opening the same
    new file (two processes starting together, a tool's threads); so the mode is read first
    and the switch retried until ``timeout``. A file that stays in another mode (``:memory:``)
    is left as it is."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if mode in ("wal", "memory"):
                return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            return  # it still works in its own mode; WAL is for concurrency, not correctness
        time.sleep(delay)
        delay = min(delay * 2, 0.1)

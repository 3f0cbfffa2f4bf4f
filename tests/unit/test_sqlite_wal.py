"""A new SQLite file opened by several connections at once ends in WAL mode, and every
opener succeeds (two processes starting together, a tool's threads)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from alpaca_engine.sqlite_wal import enable_wal
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.toolkit.idempotency import IdempotencyLedger


def _together(count: int, body: Callable[[], object]) -> list[BaseException]:
    """Run ``body`` on ``count`` threads released at the same moment; what they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run() -> None:
        start.wait()
        try:
            body()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _open_connection(path: Path) -> None:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        enable_wal(conn)
        conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    finally:
        conn.close()


def _open_store(path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(f"sqlite:///{path}")
        await store.open()
        await store.close()

    asyncio.run(go())


def test_connections_opening_a_new_file_together_all_get_wal(tmp_path: Path) -> None:
    # The race is narrow (under load, about 1 in 20 with a plain PRAGMA): try it often.
    for path in (tmp_path / f"f{attempt}.db" for attempt in range(100)):
        assert _together(8, lambda p=path: _open_connection(p)) == []
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


def test_ledgers_and_stores_opening_a_new_file_together_all_open(tmp_path: Path) -> None:
    for attempt in range(10):
        ledger, store = tmp_path / f"l{attempt}.db", tmp_path / f"s{attempt}.db"
        assert _together(6, lambda p=ledger: IdempotencyLedger(p)) == []
        assert _together(4, lambda p=store: _open_store(p)) == []

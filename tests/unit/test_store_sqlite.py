"""SQLite passes the shared store conformance suite, in memory and as a WAL file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alpaca_engine.store.factory import make_store
from alpaca_engine.store.migrations import SQLITE
from alpaca_engine.store.sqlite import SQLiteStore
from tests.conformance.store_suite import (
    LedgerApprovalKeyConformance,
    StoreConformance,
    ThreadConformance,
    WorkflowConformance,
)


class TestSQLiteMemory(StoreConformance, LedgerApprovalKeyConformance, WorkflowConformance,
                       ThreadConformance):
    pass  # uses the in-memory ``store`` fixture of tests/unit/conftest.py


class TestSQLiteFile(StoreConformance, LedgerApprovalKeyConformance, WorkflowConformance,
                     ThreadConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SQLiteStore]:
        s = SQLiteStore(f"sqlite:///{tmp_path}/alpaca.db", audit_key=b"k")
        await s.open()
        yield s
        await s.close()


async def test_file_is_wal_and_migrations_are_versioned(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/a.db"
    s = SQLiteStore(url)
    await s.open()
    assert s.schema_version() == len(SQLITE)
    mode = s._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert s.upgrade() == []  # nothing pending the second time
    await s.close()


def test_factory_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="unsupported"):
        make_store("oracle://x")
    with pytest.raises(ValueError, match="sqlite URL"):
        SQLiteStore("sqlite:/relative")

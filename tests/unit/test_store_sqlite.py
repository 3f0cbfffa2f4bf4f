"""SQLite passes the shared store conformance suite, in memory and as a WAL file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.factory import make_store
from alpaca_engine.store.migrations import SQLITE
from alpaca_engine.store.records import RunRecord
from alpaca_engine.store.sqlite import SQLiteStore
from tests.conformance.store_suite import (
    LedgerApprovalKeyConformance,
    StoreConformance,
    ThreadConformance,
    WorkflowConformance,
    new_run,
)


class Exact:
    @staticmethod
    def same_record(returned: RunRecord, stored: RunRecord) -> None:
        """The record a claim or a transition returns without reading the row back is the
        row, to the type (a whole-number time reads back a float) and the JSON text."""
        assert returned.model_dump_json() == stored.model_dump_json()


class TestSQLiteMemory(Exact, StoreConformance, LedgerApprovalKeyConformance,
                       WorkflowConformance, ThreadConformance):
    pass  # uses the in-memory ``store`` fixture of tests/unit/conftest.py


class TestSQLiteFile(Exact, StoreConformance, LedgerApprovalKeyConformance, WorkflowConformance,
                     ThreadConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SQLiteStore]:
        s = SQLiteStore(f"sqlite:///{tmp_path}/alpaca.db", audit_key=b"k")
        await s.open()
        yield s
        await s.close()


class TestSQLiteFileOnTheWriterThread(Exact, StoreConformance, LedgerApprovalKeyConformance,
                                      WorkflowConformance, ThreadConformance):
    """Every write as it runs when the file is locked by another process: on the writer
    thread's connection (the loop's connection only reads)."""

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SQLiteStore]:
        s = SQLiteStore(f"sqlite:///{tmp_path}/alpaca.db", audit_key=b"k")
        await s.open()
        s._orphaned += 1  # as if a cancelled caller's unit were on the thread: writes queue
        yield s
        s._orphaned -= 1
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


async def test_a_transitions_output_is_kept_by_the_next_one_and_returned(store: SQLiteStore):
    """Output given before the end (COALESCE keeps it) is in what each transition returns."""
    await store.create_run(new_run("r1"))
    run = await store.claim_run("r1", "w", 10, 100)
    assert run is not None
    first = await store.transition("r1", RunState.QUEUED, 101, epoch=run.epoch, output="part",
                                   output_type="json", usage={"b": 1, "a": [2.5]})
    second = await store.transition("r1", RunState.RUNNING, 102, epoch=run.epoch)
    assert (second.output, second.output_type, second.usage) == ("part", "json",
                                                                 {"b": 1, "a": [2.5]})
    for returned in (first, second):
        assert returned.output == "part"
    Exact.same_record(second, await store.get_run("r1"))


def test_factory_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="unsupported"):
        make_store("oracle://x")
    with pytest.raises(ValueError, match="SQLite URL needs three slashes"):
        SQLiteStore("sqlite:/relative")


async def test_migration_5_adds_threads_to_a_database_of_version_4(tmp_path: Path):
    """A database left by the engine before threads: its runs are plain runs after the
    upgrade, and threads work beside them."""
    from alpaca_engine.lifecycle import RunState
    from tests.conformance.store_suite import new_run, new_thread, new_turn

    url = f"sqlite:///{tmp_path}/v4.db"
    old = SQLiteStore(url)
    old.upgrade = lambda: _apply(old, 4)  # type: ignore[method-assign]
    await old.open()
    assert old.schema_version() == 4
    old._conn.execute("INSERT INTO runs(id, tenant, agent, workflow, input, state, root_id, "
                      "created_at, updated_at) VALUES ('r0','t1','a','w','hi','succeeded',"
                      "'r0',1,1)")
    await old.close()
    store = SQLiteStore(url)
    await store.open()
    try:
        assert store.migrations_applied[0] == 5 and store.schema_version() == len(SQLITE)
        before = await store.get_run("r0")
        assert (before.thread_id, before.turn, before.state) == (None, None, RunState.SUCCEEDED)
        await store.create_thread(new_thread())
        turn, _ = await store.create_turn(new_turn("r1"))
        assert turn.turn == 1 and [r.id for r in await store.list_turns("th1")] == ["r1"]
        await store.create_run(new_run("r2"))
        assert (await store.get_run("r2")).thread_id is None
    finally:
        await store.close()


def _apply(store: SQLiteStore, upto: int) -> list[int]:
    """The first ``upto`` migrations only, as an older engine would have applied them."""
    db = store._conn
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY)")
    for version, script in enumerate(SQLITE[:upto], start=1):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO schema_migrations(version) VALUES (?)", (version,))
    return list(range(1, upto + 1))

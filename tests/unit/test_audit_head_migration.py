"""Migration 3 backfills the chain head of runs written before it, so they verify (and any
later loss of their records is caught) on SQLite; PostgreSQL and MongoDB have their own."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from alpaca_engine.store.migrations import SQLITE
from alpaca_engine.store.mongo import MIGRATIONS, MongoStore
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.telemetry.audit import GENESIS, AuditChain
from alpaca_engine.verification import verify_run
from tests.integration.test_store_mongo import _fake_server

KEY = b"k"


def _version_2_database(path: Path) -> list[str]:
    """A database as the engine left it before migration 3: two runs, one with a chain."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
    for version, script in enumerate(SQLITE[:2], start=1):
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
    for rid, state in (("old", "succeeded"), ("empty", "queued")):
        conn.execute("INSERT INTO runs(id, tenant, agent, workflow, input, state, root_id, "
                     "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
                     (rid, "t", "a", "w", "hi", state, rid, 1.0, 1.0))
    chain = AuditChain("old", key=KEY)
    records = [chain.append("run.created", {}, "engine", "2026-01-01T00:00:00.000000Z"),
               chain.append("state.changed", {"from": "running", "to": "succeeded"}, "engine",
                            "2026-01-01T00:00:01.000000Z")]
    conn.executemany("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)",
                     [(r.run_id, r.seq, r.time, r.actor, r.kind, json.dumps(r.data),
                       r.prev_hash, r.hash) for r in records])
    conn.commit()
    conn.close()
    return [r.hash for r in records]


async def test_migration_3_backfills_heads_from_existing_chains(tmp_path: Path) -> None:
    db = tmp_path / "v2.db"
    hashes = _version_2_database(db)
    store = SQLiteStore(f"sqlite:///{db}", audit_key=KEY)
    await store.open()
    try:
        assert store.schema_version() == len(SQLITE) >= 3
        old, empty = await store.get_run("old"), await store.get_run("empty")
        assert old.audit_head == (2, hashes[-1]) and old.crash_count == 0
        assert empty.audit_head == (0, GENESIS)
        assert (await verify_run(store, old, KEY)).result.ok
        assert (await verify_run(store, empty, KEY)).result.ok
        store._conn.execute("DELETE FROM audit WHERE run_id='old' AND seq=2")
        lost = await verify_run(store, old, KEY)
        assert not lost.result.ok and lost.result.first_bad_seq == 2
    finally:
        await store.close()


async def test_mongo_backfill_sets_heads_of_documents_written_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the fake driver: a database migrated to index set 1 only, with a run document and
    its chain as the old store wrote them, gets its head from the chain when opened."""
    server = _fake_server(monkeypatch)
    old = MongoStore("mongodb://fake/app", audit_key=KEY)
    monkeypatch.setattr("alpaca_engine.store.mongo.MIGRATIONS", MIGRATIONS[:1])
    await old.open()
    db = server.databases["app"]
    await db["runs"].insert_one({"_id": "old", "tenant": "t", "agent": "a", "workflow": "w",
                                 "input": "hi", "state": "queued", "root_id": "old",
                                 "version": 0})
    chain = AuditChain("old", key=KEY)
    for i in range(2):
        await db["audit"].insert_one(
            chain.append("note", {"i": i}, "engine", "2026-01-01T00:00:00.000000Z").to_dict())
    await old.close()
    monkeypatch.setattr("alpaca_engine.store.mongo.MIGRATIONS", MIGRATIONS)
    new = MongoStore("mongodb://fake/app", audit_key=KEY)
    await new.open()
    try:
        assert await new.schema_version() == len(MIGRATIONS) >= 2
        run = await new.get_run("old")
        assert run.audit_head == (2, chain.last_hash) and run.crash_count == 0
        assert (await verify_run(new, run, KEY)).result.ok
    finally:
        await new.close()

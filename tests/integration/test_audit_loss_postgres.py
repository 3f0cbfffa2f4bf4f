"""Loss is tampering on the real PostgreSQL (DESIGN §7): records deleted from the end of a
chain, a finished run's whole chain, or its terminal record verify as broken, naming the first
missing seq; keyed and unkeyed; the audit key read with surrounding whitespace is one key; and
migration 3 backfills the head of runs written before it."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from alpaca_engine.cli import app
from alpaca_engine.config import Settings
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.store.postgres_migrations import POSTGRES
from alpaca_engine.telemetry.audit import GENESIS, AuditChain
from alpaca_engine.tools.decorator import tool
from alpaca_engine.verification import verify_run
from tests.helpers import engine, workflow
from tests.integration.test_store_postgres import PG_URL, _admin, schema

pytestmark = pytest.mark.postgres
__all__ = ["schema"]  # the fixture, imported for the tests below


@tool
def lookup(q: str) -> str:
    """Answer a query."""
    return f"found {q}"


async def _finished_run(store: PostgresStore) -> str:
    wf = workflow([{"tool": "lookup", "args": {"q": "a"}}, "done"], [lookup])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded"
    return run.id


async def _delete(schema: str, where: str, *args: object) -> None:
    admin = await _admin()
    try:
        await admin.execute(
            sql.SQL("DELETE FROM {}.audit WHERE ").format(sql.Identifier(schema)) + sql.SQL(where),
            args,
        )
    finally:
        await admin.close()


@pytest.fixture(params=[None, b"k"], ids=["unkeyed", "keyed"])
async def keyed_store(request: pytest.FixtureRequest, schema: str):  # type: ignore[no-untyped-def]
    s = PostgresStore(PG_URL, audit_key=request.param, schema=schema)
    await s.open()
    yield s
    await s.close()


async def test_records_deleted_from_the_end_are_caught(keyed_store: PostgresStore, schema: str):
    run_id = await _finished_run(keyed_store)
    run = await keyed_store.get_run(run_id)
    assert (await verify_run(keyed_store, run, keyed_store.audit_key)).result.ok
    last = run.audit_seq
    await _delete(schema, "run_id=%s AND seq>=%s", run_id, last - 1)
    checked = await verify_run(keyed_store, run, keyed_store.audit_key)
    assert not checked.result.ok and checked.result.first_bad_seq == last - 1
    assert "deleted" in (checked.result.reason or "") and checked.head_seq == last


async def test_a_finished_runs_whole_chain_deleted_is_caught(keyed_store: PostgresStore,
                                                            schema: str):
    run_id = await _finished_run(keyed_store)
    await _delete(schema, "run_id=%s", run_id)
    checked = await verify_run(keyed_store, await keyed_store.get_run(run_id),
                               keyed_store.audit_key)
    assert not checked.result.ok and checked.result.first_bad_seq == 1
    assert "missing" in (checked.result.reason or "")


async def test_the_terminal_record_deleted_is_caught_by_the_cli(keyed_store: PostgresStore,
                                                               schema: str,
                                                               monkeypatch: pytest.MonkeyPatch):
    run_id = await _finished_run(keyed_store)
    last = (await keyed_store.get_run(run_id)).audit_seq
    await _delete(schema, "run_id=%s AND seq=%s", run_id, last)
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"
    if keyed_store.audit_key is not None:
        monkeypatch.setenv("ALPACA_AUDIT_KEY", keyed_store.audit_key.decode())
    else:
        monkeypatch.delenv("ALPACA_AUDIT_KEY", raising=False)
    # the command runs its own event loop: in a thread, beside this test's loop
    result = await asyncio.to_thread(CliRunner().invoke, app,
                                     ["audit", "verify", run_id, "--db", url])
    assert result.exit_code == 1, result.output
    assert f"first bad record seq {last}" in result.output
    result = await asyncio.to_thread(CliRunner().invoke, app,
                                     ["audit", "verify", "--all", "--db", url, "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.output)
    assert summary["bad"] == 1 and summary["failures"][0]["first_bad_seq"] == last


async def test_an_audit_key_with_whitespace_is_one_key(schema: str,
                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ALPACA_AUDIT_KEY", "  pg-secret\n")
    key = Settings().audit_key_bytes()
    assert key == b"pg-secret"
    s = PostgresStore(PG_URL, audit_key=key, schema=schema)
    await s.open()
    try:
        run_id = await _finished_run(s)
        run = await s.get_run(run_id)
        assert (await verify_run(s, run, b"pg-secret")).result.ok
        await _delete(schema, "run_id=%s AND seq=%s", run_id, run.audit_seq)
        checked = await verify_run(s, run, b"pg-secret")
        assert not checked.result.ok and checked.result.first_bad_seq == run.audit_seq
    finally:
        await s.close()


async def test_migration_3_backfills_heads_from_existing_chains(schema: str):
    admin = await _admin()
    try:
        ident = sql.Identifier(schema)
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        await admin.execute(sql.SQL("SET search_path TO {}").format(ident))
        async with admin.transaction():
            await admin.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
            for version, script in enumerate(POSTGRES[:2], start=1):
                await admin.execute(script.encode())
                await admin.execute("INSERT INTO schema_migrations VALUES (%s)", (version,))
            for rid in ("old", "empty"):
                await admin.execute(
                    "INSERT INTO runs(id, tenant, agent, workflow, input, state, root_id, "
                    "created_at, updated_at) VALUES (%s,'t','a','w','hi','queued',%s,1,1)",
                    (rid, rid))
            chain = AuditChain("old", key=b"k")
            for i in range(3):
                r = chain.append("note", {"i": i}, "engine", "2026-01-01T00:00:00.000000Z")
                await admin.execute(
                    "INSERT INTO audit VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
                    (r.run_id, r.seq, r.time, r.actor, r.kind, psycopg.types.json.Json(r.data),
                     r.prev_hash, r.hash))
    finally:
        await admin.close()
    s = PostgresStore(PG_URL, audit_key=b"k", schema=schema)
    await s.open()
    try:
        assert await s.schema_version() == len(POSTGRES) >= 3
        old, empty = await s.get_run("old"), await s.get_run("empty")
        assert old.audit_head == (3, chain.last_hash) and old.crash_count == 0
        assert empty.audit_head == (0, GENESIS)
        assert (await verify_run(s, old, b"k")).result.ok
    finally:
        await s.close()

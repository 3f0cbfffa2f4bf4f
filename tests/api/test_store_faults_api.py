"""While serving, a store or Redis fault answers 503 problem+json naming the fault and the fix
(never a 500, never a traceback); ``/readyz`` says 503; the service recovers by itself.

Real faults only: a SQLite file on a tmpfs that fills up, PostgreSQL and Redis taken away by
cutting a TCP proxy in front of the real servers. (A read-only or corrupt store is refused at
start: ``alpaca serve`` exits with its one line, see tests/e2e/test_store_faults_cli.py.)
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from psycopg import sql

from alpaca_engine.api import create_app
from alpaca_engine.config import Settings
from alpaca_engine.store.base import Store
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.store.sqlite import SQLiteStore
from tests.conftest import service_unavailable
from tests.faultkit import TcpProxy, fill, tmpfs
from tests.pg import PG_URL, pg_schema

from .test_problems import assert_problem

REDIS_URL = os.environ.get("ALPACA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ECHO = {"agent": "echo", "input": "hi"}


@asynccontextmanager
async def serving(store: Store, workflow: Path, **settings: object
                  ) -> AsyncIterator[httpx.AsyncClient]:
    cfg = Settings(database_url=getattr(store, "url", "sqlite:///x.db"), connect_timeout=1,
                   **settings)  # type: ignore[arg-type]
    app: FastAPI = create_app(cfg, store=store, embedded_worker=False,
                              workflows=[str(workflow)])
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://api.test") as c:
        yield c


def assert_unavailable(r: httpx.Response, code: str, faults: tuple[str, ...], says: str,
                       *secret: str) -> None:
    """A 503 naming the kind of fault, and nothing of the deployment (URL, host, path)."""
    body = assert_problem(r, 503, code)
    assert body["fault"] in faults, body
    assert says in body["detail"], body["detail"]
    assert "\n" not in body["detail"] and "Traceback" not in body["detail"]
    for hidden in secret:
        assert hidden not in body["detail"], (hidden, body["detail"])


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> None:
    """The server's log has the whole line: URL, cause and fix."""
    lines = [r.getMessage() for r in caplog.records if r.name == "alpaca.api"]
    assert any(all(p in line for p in parts) for line in lines), lines


async def test_a_full_disk_is_503_and_the_service_recovers(
        tmp_path: Path, gated_workflow: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        store = SQLiteStore(f"sqlite:///{disk}/api.db")
        await store.open()
        try:
            async with serving(store, gated_workflow) as c:
                assert (await c.post("/v1/runs", json=ECHO)).status_code == 201
                filler = fill(disk)
                full = await c.post("/v1/runs", json=ECHO)
                assert_unavailable(full, "store_unavailable", ("disk_full",),
                                   "the database is not usable: its disk is full; retry later",
                                   str(disk), "sqlite")
                assert full.headers["Retry-After"] == "5"
                logged(caplog, f"sqlite:///{disk}/api.db", "full", "Free space")
                assert (await c.get("/v1/runs")).status_code == 200  # reads still work
                ready = await c.get("/readyz")
                assert_unavailable(ready, "store_unavailable", ("disk_full",),
                                   "its disk is full", str(disk))
                filler.unlink()
                assert (await c.post("/v1/runs", json=ECHO)).status_code == 201
                assert len((await c.get("/v1/runs")).json()["items"]) == 2
        finally:
            await store.close()


async def eventually_ok(c: httpx.AsyncClient, path: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        r = await c.get(path)
        if r.status_code == 200:
            return
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, "the service did not recover"
        await asyncio.sleep(0.2)


async def test_postgresql_going_away_is_503_then_it_recovers(
        gated_workflow: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with pg_schema() as (schema, _admin):
        target = urlsplit(PG_URL)
        proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
        await proxy.start()
        store = PostgresStore(proxy.url_for(PG_URL), schema=schema, connect_timeout=1)
        await store.open()
        try:
            await database_goes_away(store, proxy, gated_workflow)
            logged(caplog, f"127.0.0.1:{proxy.port}", "ALPACA_CONNECT_TIMEOUT")
        finally:
            await store.close()
            await proxy.stop()


async def database_goes_away(store: PostgresStore, proxy: TcpProxy, workflow: Path) -> None:
    async with serving(store, workflow) as c:
        assert (await c.post("/v1/runs", json=ECHO)).status_code == 201
        await proxy.stop()  # the database is gone: connections cut, new ones refused
        started = time.monotonic()
        r = await c.get("/v1/runs")
        assert_unavailable(r, "store_unavailable", ("unreachable", "timeout"),
                           "the database is not usable", str(proxy.port), "postgres")
        assert time.monotonic() - started < 30  # bounded by the 1 s connect timeout
        assert_problem(await c.post("/v1/runs", json=ECHO), 503, "store_unavailable")
        assert_problem(await c.get("/readyz"), 503, "store_unavailable")
        await proxy.start()  # back, on the same port
        await eventually_ok(c, "/v1/runs")
        assert (await c.post("/v1/runs", json=ECHO)).status_code == 201


def local_postgres_user() -> tuple[int, int]:
    """uid/gid of the local PostgreSQL server's OS user (a tablespace directory must be
    theirs); the check is skipped (failed in CI) when the server is not on this machine."""
    import pwd

    host = urlsplit(PG_URL).hostname
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = None
    if host not in ("127.0.0.1", "localhost", "::1") or user is None:
        service_unavailable("a local PostgreSQL server", f"{host} (no local postgres user)")
        raise AssertionError("unreachable")
    return user.pw_uid, user.pw_gid


async def test_postgresql_disk_full_is_503_and_the_service_recovers(
        gated_workflow: Path) -> None:
    """The store's tables live in a tablespace on a 3 MiB tmpfs; filling it makes the
    server's next file extension fail with DiskFull (SQLSTATE 53100)."""
    uid, gid = local_postgres_user()
    suffix = uuid.uuid4().hex[:12]
    space = f"alpaca_full_{suffix}"
    where = Path(f"/tmp/alpaca-pgfull-{suffix}")
    async with pg_schema() as (schema, admin):
        with tmpfs(where, size="3m") as disk:
            await full_tablespace(disk, schema, space, admin, uid, gid, gated_workflow)
    os.rmdir(where)


async def full_tablespace(disk: Path, schema: str, space: str,
                          admin: psycopg.AsyncConnection[tuple[object, ...]], uid: int,
                          gid: int, workflow: Path) -> None:
    os.chown(disk, uid, gid)
    await admin.execute(sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(
        sql.Identifier(space), sql.Literal(str(disk))))
    options = f"options=-c%20default_tablespace%3D{space}"
    url = PG_URL + ("&" if "?" in PG_URL else "?") + options
    store = PostgresStore(url, schema=schema, connect_timeout=2)
    try:
        await store.open()
        async with serving(store, workflow) as c:
            big = {"agent": "echo", "input": os.urandom(150_000).hex()}
            assert (await c.post("/v1/runs", json=big)).status_code == 201
            filler = fill(disk)
            r = await c.post("/v1/runs", json=big)
            assert_unavailable(r, "store_unavailable", "disk_full",
                               "the database is not usable: its disk is full", str(disk))
            assert r.headers["Retry-After"] == "5"
            assert_problem(await c.get("/readyz"), 503, "store_unavailable")
            filler.unlink()
            assert (await c.post("/v1/runs", json=big)).status_code == 201
            assert len((await c.get("/v1/runs")).json()["items"]) == 2
    finally:
        await store.close()
        # The schema's tables first: a tablespace must be empty to go.
        await admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                            .format(sql.Identifier(schema)))
        await admin.execute(sql.SQL("DROP TABLESPACE IF EXISTS {}")
                            .format(sql.Identifier(space)))


async def test_redis_going_away_is_503_on_what_needs_it(
        tmp_path: Path, gated_workflow: Path, caplog: pytest.LogCaptureFixture) -> None:
    import redis.asyncio as aioredis

    target = urlsplit(REDIS_URL)
    try:
        probe = aioredis.from_url(REDIS_URL, socket_connect_timeout=2)
        await probe.ping()
        await probe.aclose()
    except Exception as exc:
        service_unavailable("Redis", str(exc))
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    store = SQLiteStore(f"sqlite:///{tmp_path}/api.db")
    await store.open()
    try:
        async with serving(store, gated_workflow,
                           redis_url=f"redis://127.0.0.1:{proxy.port}/0") as c:
            assert (await c.get("/v1/breakers")).status_code == 200
            await proxy.stop()
            r = await c.get("/v1/breakers")
            assert_unavailable(r, "coordination_unavailable", ("unreachable", "timeout"),
                               "Redis is not usable", str(proxy.port))
            logged(caplog, f"Redis redis://127.0.0.1:{proxy.port}/0", "ALPACA_REDIS_URL")
            assert (await c.get("/v1/runs")).status_code == 200  # the store does not need it
            await proxy.start()
            await eventually_ok(c, "/v1/breakers")
    finally:
        await store.close()
        await proxy.stop()

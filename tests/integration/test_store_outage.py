"""A worker outlives a PostgreSQL outage: one log line when the store goes away, one when it
is back, no crash, and the work queued meanwhile gets done. PostgreSQL is real; a TCP proxy
in front of it is cut to take it away."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.worker import Worker
from tests.conftest import service_unavailable
from tests.faultkit import TcpProxy
from tests.helpers import workflow

pytestmark = pytest.mark.postgres

PG_URL = os.environ.get("ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def until(predicate: object, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_worker_logs_one_line_per_outage_and_keeps_working(
        caplog: pytest.LogCaptureFixture) -> None:
    try:
        admin = await psycopg.AsyncConnection.connect(PG_URL, autocommit=True,
                                                      connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).strip())
        raise
    schema = f"alpaca_test_{uuid.uuid4().hex[:12]}"
    target = urlsplit(PG_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = target._replace(netloc=(target.netloc.rsplit("@", 1)[0] + "@"
                                      if "@" in target.netloc else "")
                              + f"127.0.0.1:{proxy.port}").geturl()
    store = PostgresStore(proxied, schema=schema, connect_timeout=1)
    direct = PostgresStore(PG_URL, schema=schema)
    wf = workflow(["done"], [])
    await store.open()
    await direct.open()
    worker = Worker(Engine(store, lambda ref: wf, lease_seconds=5), poll_interval=0.1,
                    reap_interval=0.5)
    caplog.set_level(logging.INFO, logger="alpaca.worker")
    task = asyncio.create_task(worker.run())
    try:
        first = await Engine(direct, lambda ref: wf).submit(wf, "agent", "before")
        await until(lambda: worker.completed >= 1, "the first run")
        await proxy.stop()
        queued = await Engine(direct, lambda ref: wf).submit(wf, "agent", "during")
        await asyncio.sleep(4)  # many polls and reaper sweeps against a missing database
        assert not task.done(), task
        down = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(down) == 1, [r.getMessage() for r in down]  # not one per poll or retry
        assert f"127.0.0.1:{proxy.port}" in down[0].getMessage()
        assert down[0].levelno == logging.WARNING and "retrying" in down[0].getMessage()
        assert "Traceback" not in caplog.text
        await proxy.start()
        await until(lambda: worker.completed >= 2, "the run queued during the outage")
        assert (await direct.get_run(queued.id)).state == RunState.SUCCEEDED
        assert (await direct.get_run(first.id)).state == RunState.SUCCEEDED
        assert any("usable again" in r.getMessage() for r in caplog.records)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await store.close()
        await direct.close()
        await proxy.stop()
        await admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                            .format(sql.Identifier(schema)))
        await admin.close()

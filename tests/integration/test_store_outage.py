"""A worker outlives a PostgreSQL outage: one log line when the store goes away, one when it
is back, no crash, and the work queued meanwhile gets done. PostgreSQL is real; a TCP proxy
in front of it is cut to take it away."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import pytest

from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.worker import Worker
from tests.faultkit import TcpProxy
from tests.helpers import workflow
from tests.pg import PG_URL, pg_schema

pytestmark = pytest.mark.postgres


async def until(predicate: object, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_worker_logs_one_line_per_outage_and_keeps_working(
        caplog: pytest.LogCaptureFixture) -> None:
    async with pg_schema() as (schema, _admin):
        target = urlsplit(PG_URL)
        proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
        await proxy.start()
        store = PostgresStore(proxy.url_for(PG_URL), schema=schema, connect_timeout=1)
        direct = PostgresStore(PG_URL, schema=schema)
        await store.open()
        await direct.open()
        try:
            await outage(store, direct, proxy, caplog)
        finally:
            await store.close()
            await direct.close()
            await proxy.stop()


async def outage(store: PostgresStore, direct: PostgresStore, proxy: TcpProxy,
                 caplog: pytest.LogCaptureFixture) -> None:
    wf = workflow(["done"], [])
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

"""Work reaches a worker through the Redis dispatch stream, not by waiting for a store poll:
a delegated child and the parent its finish wakes run on a worker whose poll interval is
longer than the test's patience; a worker at capacity takes the next delivery when a slot
frees. And the store poll stays the safety net for a run that was never announced.
Real PostgreSQL and Redis; the workers run in this process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from alpaca_engine.agents import Agent
from alpaca_engine.coord.redis import RedisDispatcher
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.worker import Worker
from alpaca_engine.workflow import Workflow
from tests.helpers import PATIENCE
from tests.integration.test_redis_coord import REDIS_URL
from tests.pg import PG_URL, pg_schema

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

NEVER = 10 * PATIENCE
"""A poll interval no test waits for: what finishes, finished without a poll."""

TREE = Workflow(ref="test", agents={
    "boss": Agent(name="boss", model=ScriptedModel(
        [{"tool": "delegate_to_helper", "args": {"task": "help"}}, "delegated"]),
        delegates_to=["helper"]),
    "helper": Agent(name="helper", model=ScriptedModel(["helped"])),
}, tools=ToolRegistry([]))


@pytest.fixture
async def setup() -> AsyncIterator[tuple[PostgresStore, Callable[[], RedisDispatcher]]]:
    """A store on a fresh schema, and dispatchers on a fresh stream of the real Redis."""
    stream = f"alpaca:test:{uuid.uuid4().hex[:8]}"
    client = aioredis.from_url(REDIS_URL, socket_connect_timeout=2)
    async with pg_schema() as (schema, _admin):
        store = PostgresStore(PG_URL, schema=schema)
        await store.open()
        try:
            yield store, lambda: RedisDispatcher(client, stream=stream)
        finally:
            await store.close()
            await client.delete(stream)
            await client.aclose()


async def _finished(store: PostgresStore, run_ids: list[str]) -> None:
    deadline = time.monotonic() + PATIENCE
    for run_id in run_ids:
        while not (await store.get_run(run_id)).state.terminal:
            assert time.monotonic() < deadline, f"run {run_id} did not finish"
            await asyncio.sleep(0.05)


async def _working(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.2)  # past its first store poll: from now on only deliveries count
    return task


async def test_a_delegated_child_and_its_woken_parent_come_by_the_stream(setup) -> None:
    store, dispatcher = setup
    worker = Worker(Engine(store, lambda ref: TREE, dispatcher=dispatcher()),
                    poll_interval=NEVER, reap_interval=NEVER)
    task = await _working(worker)
    try:
        parent = await Engine(store, lambda ref: TREE, dispatcher=dispatcher()).submit(
            TREE, "boss", "go")
        await _finished(store, [parent.id])
        done = await store.get_run(parent.id)
        assert done.state == RunState.SUCCEEDED and done.output == "delegated"
        [child] = await store.list_runs(parent_id=parent.id)
        assert child.state == RunState.SUCCEEDED and child.output == "helped"
    finally:
        worker.stop()
        await asyncio.wait_for(task, PATIENCE)


async def test_a_full_worker_takes_the_next_delivery_when_a_slot_frees(setup) -> None:
    store, dispatcher = setup
    worker = Worker(Engine(store, lambda ref: TREE, dispatcher=dispatcher()), concurrency=1,
                    poll_interval=NEVER, reap_interval=NEVER)
    task = await _working(worker)
    try:
        submitter = Engine(store, lambda ref: TREE, dispatcher=dispatcher())
        runs = [await submitter.submit(TREE, "helper", f"job {i}") for i in range(4)]
        await _finished(store, [r.id for r in runs])
        assert {(await store.get_run(r.id)).state for r in runs} == {RunState.SUCCEEDED}
        assert worker.completed == 4
    finally:
        worker.stop()
        await asyncio.wait_for(task, PATIENCE)


async def test_a_run_never_announced_is_found_by_the_store_poll(setup) -> None:
    store, dispatcher = setup
    worker = Worker(Engine(store, lambda ref: TREE, dispatcher=dispatcher()),
                    poll_interval=0.2, reap_interval=NEVER)
    task = await _working(worker)
    try:
        quiet = await Engine(store, lambda ref: TREE).submit(TREE, "helper", "unannounced")
        await _finished(store, [quiet.id])
        assert (await store.get_run(quiet.id)).state == RunState.SUCCEEDED
    finally:
        worker.stop()
        await asyncio.wait_for(task, PATIENCE)

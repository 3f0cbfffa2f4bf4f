"""One owner, always, on the real PostgreSQL (DESIGN §3): two resumes of the same interrupted
run started together (each on its own thread, event loop and connection pool), 20 times."""

from __future__ import annotations

import asyncio

import pytest

from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.verification import verify_run
from tests.integration.test_store_postgres import PG_URL, schema
from tests.ownership_race import Effects, check, in_threads, interrupted_run

pytestmark = pytest.mark.postgres
__all__ = ["schema"]  # the fixture, imported for the test below


async def test_two_resumes_started_together_one_wins_20_times(schema: str) -> None:
    store = PostgresStore(PG_URL, schema=schema)
    await store.open()
    try:
        for _trial in range(20):
            effects = Effects()
            run_id = await interrupted_run(store, effects)
            outcomes = await asyncio.to_thread(
                in_threads, lambda: PostgresStore(PG_URL, schema=schema, pool_size=2), run_id,
                effects)
            check(outcomes, effects, run_id)
            final = await store.get_run(run_id)
            assert final.state == "succeeded" and final.crash_count == 1
            assert (await verify_run(store, final, None)).result.ok
    finally:
        await store.close()

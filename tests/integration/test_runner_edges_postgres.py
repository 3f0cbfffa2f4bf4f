"""The runner's edge cases on the real PostgreSQL: every failure path ends recorded with no
step left ``started`` (psycopg refuses lone surrogates, PostgreSQL refuses ``\\u0000``-style
escapes it cannot store), and an overspending provider exhausts the ledger in the store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from alpaca_engine.store.postgres import PostgresStore
from tests.failure_paths import SCENARIOS, check_invariant, overspent_model
from tests.integration.test_store_postgres import _open, schema  # noqa: F401 - the fixture

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStore]:  # noqa: F811 - uses the fixture
    s = await _open(schema)
    yield s
    await s.close()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_every_failure_path_ends_recorded(store: PostgresStore, name: str) -> None:
    await check_invariant(store, name)


async def test_overspend_is_settled_into_the_ledger_and_stops_the_run(
        store: PostgresStore) -> None:
    ended = await overspent_model(store)
    assert ended.run.state == "failed" and ended.run.error_code == "budget_exceeded"
    ledger = await store.get_ledger(ended.run.id)
    assert ledger.used["tokens"] == 270 and ledger.exhausted == "tokens"
    kinds = [a.kind for a in await store.list_audit(ended.run.id)]
    assert "budget.overrun" in kinds

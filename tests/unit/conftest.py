from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from alpaca_engine.store.sqlite import SQLiteStore


@pytest.fixture
async def store() -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore("sqlite:///:memory:")
    await s.open()
    yield s
    await s.close()

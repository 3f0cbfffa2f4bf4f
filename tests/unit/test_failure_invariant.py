"""No failure path leaves a run half-written (SQLite; tests/integration repeats it on
PostgreSQL): the run ends terminal or waiting, and no step of a terminal run is ``started``."""

from __future__ import annotations

import pytest

from tests.failure_paths import SCENARIOS, check_invariant


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_every_failure_path_ends_recorded(store, name: str) -> None:
    await check_invariant(store, name)

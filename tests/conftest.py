"""Shared fixtures. Service-backed tests fail (not skip) under CI=true when unreachable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist workers inherit COLUMNS=80 from their launcher; Rich consoles created at import
    # would freeze that width, where a serial run leaves it to the tests that set COLUMNS.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


def service_unavailable(what: str, reason: str) -> None:
    """Skip locally, fail loudly in CI: a missing service must never pass silently there."""
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unreachable: {reason}", pytrace=False)
    pytest.skip(f"{what} unreachable: {reason}")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite file as ``ALPACA_DATABASE_URL`` for in-process CLI tests, with a wide
    terminal so Rich does not wrap what they read."""
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("ALPACA_DATABASE_URL", url)
    monkeypatch.setenv("COLUMNS", "200")
    return url

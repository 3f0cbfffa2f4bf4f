"""Tools that misbehave the way careless scripts do, for the poison-tool e2e tests."""

from __future__ import annotations

import sys
import time

from alpaca_engine.tools.decorator import tool


@tool
def explode() -> str:
    """Exit the process with status 3 (the code `alpaca run` uses for 'waiting')."""
    sys.exit(3)


@tool(timeout=0.5)
def stuck() -> str:
    """Ignore the timeout: block far longer than any test waits."""
    time.sleep(300)
    return "too late"


@tool
def hello(name: str) -> str:
    """Greet someone."""
    return f"hello {name}"

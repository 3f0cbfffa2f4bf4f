"""A tool that runs until the test creates its stop file, ticking on the event loop.

Each tick is the time of one wake-up of the worker's event loop: a gap in them while
another process holds the database's write lock means the loop was stalled."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.tools.decorator import tool


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


@tool
async def hold_on() -> str:
    """Tick until the stop file exists (at most two minutes); each call is recorded."""
    base = Path(os.environ["ALPACA_TEST_DIR"])
    _append(base / "effects.jsonl", json.dumps({"pid": os.getpid(), "at": time.time()}))
    deadline = time.monotonic() + 120
    while not (base / "stop").exists() and time.monotonic() < deadline:
        _append(base / "ticks", repr(time.time()))
        await asyncio.sleep(0.05)
    return "held"


def plan(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    if any(m.role == "tool" for m in messages):
        return "done"
    return {"tool": "hold_on", "args": {}}

"""A poison tool that kills its own process (a native crash, as far as the engine can tell)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.tools.decorator import tool


@tool
def crash() -> str:
    """Record the attempt, then SIGKILL this process: nothing after it runs."""
    with open(os.environ["ALPACA_TEST_EFFECTS"], "a") as f:
        f.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def plan(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    if not any(m.role == "tool" for m in messages):
        return {"tool": "crash", "args": {}}
    return "the process survived"

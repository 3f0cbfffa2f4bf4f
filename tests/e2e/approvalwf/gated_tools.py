"""A side effect that must wait for a supervisor; logs each execution to a file."""

from __future__ import annotations

import json
import os

from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool


@tool(capabilities=["announce"])
def announce(message: str, ctx: ToolContext) -> str:
    """Announce something to everyone."""
    with open(os.environ["ALPACA_TEST_EFFECTS"], "a") as f:
        f.write(json.dumps({"message": message, "key": ctx.idempotency_key}) + "\n")
    return f"announced: {message}"

"""Tools and model for the crash tests; they log to files named by environment variables."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool

LABELS = ["first", "block", "last"]


@tool
def side_effect(label: str, ctx: ToolContext) -> str:
    """Record an external side effect; the 'block' one hangs the first time."""
    with open(os.environ["ALPACA_TEST_EFFECTS"], "a") as f:
        f.write(json.dumps({"label": label, "key": ctx.idempotency_key, "pid": os.getpid()})
                + "\n")
    marker = Path(os.environ["ALPACA_TEST_MARKER"])
    if label == "block" and not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(120)  # killed here
    if label == "block":  # the re-execution: held a while if a test asks (a racing resume)
        time.sleep(float(os.environ.get("ALPACA_TEST_HOLD", "0")))
    return f"done {label}"


def plan(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    with open(os.environ["ALPACA_TEST_MODEL_LOG"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(),
                            "messages": [m.model_dump() for m in messages]}) + "\n")
    done = sum(1 for m in messages if m.role == "tool")
    if done < len(LABELS):
        return {"tool": "side_effect", "args": {"label": LABELS[done]}}
    return "wrote " + ", ".join(LABELS)


def chat(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """A thread's agent: each user message becomes one side effect, then the answer quotes
    the result; every call logs the conversation it was sent (the kill test compares)."""
    with open(os.environ["ALPACA_TEST_MODEL_LOG"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(),
                            "messages": [m.model_dump() for m in messages]}) + "\n")
    last = messages[-1]
    if last.role == "user":
        return {"tool": "side_effect", "args": {"label": last.content}}
    turns = sum(1 for m in messages if m.role == "user")
    return f"turn {turns}: {last.content}"

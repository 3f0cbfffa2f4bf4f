"""Tools and model for the storage-fault tests; they log to files named by environment
variables (kept outside the filesystem the tests fill)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool

LABELS = ["first", "fill", "last"]


def _fill(directory: Path) -> None:
    """Leave no byte free on the filesystem holding the database."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)


@tool
def record(label: str, ctx: ToolContext) -> str:
    """Record a side effect; the 'fill' one fills the database's disk the first time."""
    with open(os.environ["ALPACA_TEST_EFFECTS"], "a") as f:
        f.write(json.dumps({"label": label, "key": ctx.idempotency_key}) + "\n")
    marker = Path(os.environ["ALPACA_TEST_MARKER"])
    if label == "fill" and not marker.exists():
        marker.write_text("filled")
        _fill(Path(os.environ["ALPACA_TEST_FILL_DIR"]))
    return f"done {label}"


def plan(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    done = sum(1 for m in messages if m.role == "tool")
    if done < len(LABELS):
        return {"tool": "record", "args": {"label": LABELS[done]}}
    return "recorded " + ", ".join(LABELS)

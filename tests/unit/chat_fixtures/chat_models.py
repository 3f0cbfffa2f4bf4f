"""Offline models of the chat tests (see workflow.yaml)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec


def pal(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    users = [m.content or "" for m in messages if m.role == "user"]
    latest = users[-1]
    if messages[-1].role == "tool":
        return f"The result is {json.loads(messages[-1].content or 'null')}."
    if latest == "boom":
        raise RuntimeError("the model broke")
    if latest.startswith("calc "):
        return {"tool": "calculate", "args": {"expression": latest[5:]}}
    return "you said: " + " / ".join(users)


def typed(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    latest = [m.content or "" for m in messages if m.role == "user"][-1]
    return json.dumps({"words": len(latest.split())})

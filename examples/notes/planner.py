"""An offline stand-in for a language model: it plans from the tool results it has seen,
so the example runs without an API key. Swap `provider: function` for `provider: openai`
in workflow.yaml to use a real model."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec


def researcher(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    question = next(m.content or "" for m in messages if m.role == "user")
    results = [(m.name, json.loads(m.content or "null")) for m in messages if m.role == "tool"]
    if not results:
        return {"tool": "search_notes", "args": {"query": question}}
    name, last = results[-1]
    if name == "search_notes":
        if not last:
            return "I found no note about that."
        return {"tool": "read_note", "args": {"note": last[0]["note"]}}
    if name == "read_note" and isinstance(last, str):
        numbers = re.findall(r"(\d+) (input|output) tokens", last)
        prices = re.findall(r"([\d.]+) USD per million (input|output)", last)
        if numbers and prices and not any(n == "calculate" for n, _ in results):
            tokens = {kind: n for n, kind in numbers}
            price = {kind: p for p, kind in prices}
            expr = (f"{tokens['input']} * {price['input']} / 1000000 + "
                    f"{tokens['output']} * {price['output']} / 1000000")
            return {"tool": "calculate", "args": {"expression": expr}}
        return last.split("\n", 2)[-1].strip()
    if name == "calculate":
        return f"A report costs about {last:.6f} USD in model tokens."
    return "Done."

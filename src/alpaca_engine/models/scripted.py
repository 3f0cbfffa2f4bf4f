"""A model that plays a list of responses: deterministic tests and offline demos."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .base import Message, ModelError, ModelResponse, ToolCall, ToolSpec, Usage, model_turn_index

ScriptItem = ModelResponse | str | dict[str, Any]


def to_response(item: ScriptItem, turn: int) -> ModelResponse:
    """Accept shorthand: a string is a final answer; a dict names tool calls.

    ``{"tool": "add", "args": {...}}`` or ``{"calls": [{"tool": ..., "args": ...}], "text": ...}``.
    ``args`` may be a string to script malformed JSON on purpose.
    """
    if isinstance(item, ModelResponse):
        return item
    if isinstance(item, str):
        return ModelResponse(content=item, usage=Usage(input_tokens=10, output_tokens=5))
    calls = item.get("calls", [item])
    tool_calls = []
    for i, call in enumerate(calls):
        args = call.get("args", {})
        raw = args if isinstance(args, str) else json.dumps(args, sort_keys=True)
        tool_calls.append(ToolCall(id=call.get("id", f"call_{turn}_{i}"), name=call["tool"],
                                   arguments=raw))
    usage = item.get("usage", {"input_tokens": 10, "output_tokens": 5})
    return ModelResponse(content=item.get("text"), tool_calls=tool_calls, usage=Usage(**usage))


class ScriptedModel:
    """Returns ``script[n]`` on the n-th assistant turn of the conversation.

    The position comes from the conversation, not from a counter, so a run resumed in a new
    process gets the same answer it would have got before the crash.
    """

    def __init__(self, script: Sequence[ScriptItem], name: str = "scripted") -> None:
        self._script = list(script)
        self._name = name
        self.calls: list[list[Message]] = []

    @property
    def name(self) -> str:
        return self._name

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec]
    ) -> ModelResponse:
        self.calls.append(list(messages))
        turn = model_turn_index(messages)
        if turn >= len(self._script):
            raise ModelError(f"scripted model {self._name!r} has no response for turn {turn}")
        response = to_response(self._script[turn], turn)
        if response.model is None:
            response = response.model_copy(update={"model": self._name})
        return response

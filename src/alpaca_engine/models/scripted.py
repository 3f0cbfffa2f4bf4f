"""A model that plays a list of responses: deterministic tests and offline demos."""

from __future__ import annotations

import asyncio
import json
import reprlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import ValidationError

from .base import (
    MalformedModelOutput,
    Message,
    ModelDelta,
    ModelError,
    ModelResponse,
    ModelSettings,
    StreamItem,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
    model_turn_index,
)

ScriptItem = ModelResponse | str | dict[str, Any]


EXPECTED = ("a string (the final answer), a mapping with 'tool' (and optional 'args', 'id', "
            "'text', 'usage') or with 'calls': [{'tool': ..., 'args': ...}], or a ModelResponse")


def to_response(item: ScriptItem, turn: int, model: str | None = None) -> ModelResponse:
    """Accept shorthand: a string is a final answer; a dict names tool calls.

    ``{"tool": "add", "args": {...}}`` or ``{"calls": [{"tool": ..., "args": ...}], "text": ...}``.
    ``args`` may be a string to script malformed JSON on purpose. Anything else raises
    MalformedModelOutput naming what was expected (never a KeyError deep in the runner).
    A shorthand's response names ``model``; a ModelResponse is returned as it is.
    """
    if isinstance(item, ModelResponse):
        return item
    if isinstance(item, str):
        return ModelResponse(content=item, usage=Usage(input_tokens=10, output_tokens=5),
                             model=model)
    if not isinstance(item, dict):
        raise MalformedModelOutput(f"turn {turn}: got {_kind(item)}; expected {EXPECTED}")
    if "calls" in item:
        calls = item["calls"]
        if not isinstance(calls, list):
            raise MalformedModelOutput(
                f"turn {turn}: 'calls' is {_kind(calls)}; expected a list of tool calls")
    elif "tool" in item:
        calls = [item]
    else:
        raise MalformedModelOutput(
            f"turn {turn}: a mapping without 'tool' or 'calls' (keys: "
            f"{', '.join(map(str, item)) or 'none'}); expected {EXPECTED}")
    tool_calls = [_call(call, turn, i) for i, call in enumerate(calls)]
    try:
        usage = Usage(**item.get("usage", {"input_tokens": 10, "output_tokens": 5}))
        return ModelResponse(content=item.get("text"), tool_calls=tool_calls, usage=usage,
                             model=model)
    except (TypeError, ValidationError) as exc:
        detail = str(exc).splitlines()[0]
        raise MalformedModelOutput(
            f"turn {turn}: expected 'text' to be a string and 'usage' a mapping of "
            f"input_tokens/output_tokens integers ({detail})") from None


def _call(call: Any, turn: int, index: int) -> ToolCall:
    if not isinstance(call, dict) or not isinstance(call.get("tool"), str):
        raise MalformedModelOutput(
            f"turn {turn}: tool call {index} is {_kind(call)}; expected a mapping with a "
            "string 'tool' and optional 'args' (a mapping, or a string of raw JSON)")
    args = call.get("args", {})
    try:
        raw = args if isinstance(args, str) else json.dumps(args, sort_keys=True)
    except (TypeError, ValueError, RecursionError) as exc:
        raise MalformedModelOutput(
            f"turn {turn}: the args of tool call {index} are not JSON-encodable "
            f"({type(exc).__name__}); pass a mapping of JSON values or a JSON string") from None
    call_id = call.get("id", f"call_{turn}_{index}")
    if not isinstance(call_id, str):
        raise MalformedModelOutput(f"turn {turn}: the id of tool call {index} must be a string")
    return ToolCall(id=call_id, name=call["tool"], arguments=raw)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {reprlib.repr(value)}"


DEFAULT_CHUNK = 16
"""Characters per delta of an offline model that streams."""


def chunks(response: ModelResponse, size: int = DEFAULT_CHUNK) -> list[ModelDelta]:
    """The deltas a provider would have streamed for ``response``: its text, then each tool
    call (id and name with the first piece of its arguments), ``size`` characters a piece."""
    text = response.content or ""
    out = [ModelDelta(text=text[i:i + size]) for i in range(0, len(text), size)]
    for index, call in enumerate(response.tool_calls):
        pieces = [call.arguments[i:i + size] for i in range(0, len(call.arguments), size)]
        for n, piece in enumerate(pieces or [""]):
            out.append(ModelDelta(tool_call=ToolCallDelta(
                index=index, id=call.id if n == 0 else None,
                name=call.name if n == 0 else None, arguments=piece)))
    return out


class ChunkedStreaming:
    """Streaming for offline models: the answer ``complete`` gives, sent in chunks (after
    ``delay`` seconds each), so demos and tests stream without a provider and the turn
    stays exactly what the model answers without streaming."""

    streaming: bool = False
    chunk_size: int = DEFAULT_CHUNK
    delay: float = 0.0

    def _stream_options(self, stream: bool, chunk_size: int, delay: float) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if delay < 0:
            raise ValueError("delay must be >= 0 seconds")
        self.streaming, self.chunk_size, self.delay = stream, chunk_size, delay

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        raise NotImplementedError

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamItem]:
        response = await self.complete(messages, tools, settings)
        for delta in chunks(response, self.chunk_size):
            if self.delay:
                await asyncio.sleep(self.delay)
            yield delta
        yield response


class ScriptedModel(ChunkedStreaming):
    """Returns ``script[n]`` on the n-th assistant turn of the conversation.

    The position comes from the conversation, not from a counter, so a run resumed in a new
    process gets the same answer it would have got before the crash. With ``stream=True``
    the runner streams each answer in ``chunk_size`` pieces (``delay`` seconds apart).
    """

    def __init__(self, script: Sequence[ScriptItem], name: str = "scripted", *,
                 stream: bool = False, chunk_size: int = DEFAULT_CHUNK,
                 delay: float = 0.0) -> None:
        self._script = list(script)
        self._name = name
        self.calls: list[list[Message]] = []
        self._turns: dict[int, ModelResponse] = {}
        """Each turn's answer, converted once (a script is fixed; the runner only reads an
        answer: it redacts it into a copy of its own)."""
        self._stream_options(stream, chunk_size, delay)

    @property
    def name(self) -> str:
        return self._name

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        """Usage is reported as scripted: the output cap is not applied (tests rely on that
        to exercise the budget's overspend check)."""
        self.calls.append(list(messages))
        turn = model_turn_index(messages)
        response = self._turns.get(turn)
        if response is None:
            if turn >= len(self._script):
                raise ModelError(
                    f"scripted model {self._name!r} has no response for turn {turn}")
            response = to_response(self._script[turn], turn, self._name)
            if response.model is None:  # a ModelResponse item that names none
                response = response.model_copy(update={"model": self._name})
            self._turns[turn] = response
        return response

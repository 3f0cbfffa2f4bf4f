"""A model whose next turn is decided by a Python function (sync or async)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .base import Message, ModelResponse, ModelSettings, ToolSpec, model_turn_index
from .scripted import DEFAULT_CHUNK, ChunkedStreaming, ScriptItem, to_response

ModelFunction = Callable[
    [Sequence[Message], Sequence[ToolSpec]], ScriptItem | Awaitable[ScriptItem]
]


class FunctionModel(ChunkedStreaming):
    """With ``stream=True`` the runner streams each answer in ``chunk_size`` pieces
    (``delay`` seconds apart): what the function returned, unchanged."""

    def __init__(self, fn: ModelFunction, name: str = "function", *, stream: bool = False,
                 chunk_size: int = DEFAULT_CHUNK, delay: float = 0.0) -> None:
        self._fn = fn
        self._name = name
        self._stream_options(stream, chunk_size, delay)

    @property
    def name(self) -> str:
        return self._name

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        """The function answers as it likes (usage as given); ``settings`` is not passed on."""
        result: Any = self._fn(messages, tools)
        if inspect.isawaitable(result):
            result = await result
        response = to_response(result, model_turn_index(messages), self._name)
        if response.model is None:  # a ModelResponse that names none
            response = response.model_copy(update={"model": self._name})
        return response

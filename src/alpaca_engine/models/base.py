"""The Model protocol and the messages that flow through it.

Messages follow the chat-completions shape (system/user/assistant/tool) because every
provider we target speaks it; tool-call arguments stay the raw string the model produced so
that malformed JSON reaches the runner's input-contract gate instead of crashing an adapter.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, runtime_checkable

from pydantic import BaseModel, Field

from ..errors import ErrorCode


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str = "{}"


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


class ModelResponse(BaseModel):
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    model: str | None = None
    finish_reason: str | None = None

    def as_message(self) -> Message:
        return Message(role="assistant", content=self.content, tool_calls=self.tool_calls)


class ToolSpec(BaseModel):
    """What the model is shown of a tool: only permitted tools ever become a ToolSpec."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ModelSettings(BaseModel):
    """What the engine asks of every model call, whatever the provider.

    ``max_output_tokens`` is the cap the budget reservation assumed (the agent's
    ``limits.max_output_tokens``); a provider adapter must send it with the request so the
    ledger is not overspent by a long answer."""

    max_output_tokens: int | None = None
    output_schema: dict[str, Any] | None = None
    """The JSON Schema a typed agent's final answer must match (``None``: free text). An
    adapter whose provider can be held to a schema asks for it natively; the runner
    validates the answer either way."""
    output_name: str = "output"
    """A name for that schema (providers want one): the agent's name."""


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call as it streams: ``index`` tells the calls of a turn apart;
    ``id`` and ``name`` come with the first piece, ``arguments`` is the next raw fragment."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class ModelDelta:
    """A piece of the turn being written: answer text, or a tool call's argument fragment.

    A plain dataclass, not a pydantic model: a long answer streams thousands of them."""

    text: str | None = None
    tool_call: ToolCallDelta | None = None


StreamItem = ModelDelta | ModelResponse
"""What a streaming model yields: deltas, then exactly one ``ModelResponse`` (the turn)."""


class ModelError(Exception):
    """A provider failure. ``transient`` errors (429, 5xx, timeouts) may be retried."""

    code = ErrorCode.MODEL_ERROR

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status


class MalformedModelOutput(ModelError):
    """A model (scripted, function, custom) answered with something that is not a turn."""

    code = ErrorCode.MALFORMED_MODEL_OUTPUT


@runtime_checkable
class Model(Protocol):
    """Anything that turns a conversation and a tool list into the next assistant turn.

    ``settings`` carries the output-token cap; models written before it existed (two
    parameters) still work through :func:`call_model`, uncapped (the budget's settle check
    still stops a tree whose model overspends)."""

    @property
    def name(self) -> str: ...

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> ModelResponse: ...


@runtime_checkable
class StreamingModel(Model, Protocol):
    """A model that can also stream its turn (optional: the runner calls ``complete``
    otherwise). A model with ``streaming = False`` is not streamed even though it can be
    (a workflow switched it off).

    ``stream`` yields :class:`ModelDelta` pieces and ends with exactly one
    :class:`ModelResponse`, the completed turn: the only thing the journal keeps. A stream
    that a transient failure cuts may be retried by the model itself (its retry policy,
    reported through :data:`retry_hook` like ``complete``); deltas after such a retry
    restart the turn from its beginning."""

    def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamItem]: ...


def streams(model: Model) -> bool:
    """Whether the runner should stream this model's turns."""
    return callable(getattr(model, "stream", None)) and bool(getattr(model, "streaming", True))


async def stream_turn(model: Model, messages: Sequence[Message], tools: Sequence[ToolSpec],
                      settings: ModelSettings,
                      on_delta: Callable[[ModelDelta], None]) -> ModelResponse:
    """Consume ``model.stream``: every delta to ``on_delta``, then the completed turn.

    A stream that ends without a ``ModelResponse``, yields anything else, or goes on after
    it, is a malformed answer (never a hang or a half turn in the journal)."""
    response: ModelResponse | None = None
    source: AsyncIterator[Any] = cast(StreamingModel, model).stream(
        messages, tools, settings=settings)
    try:
        async for item in source:
            if response is not None:
                raise MalformedModelOutput(
                    "stream() yielded more after its ModelResponse; the response ends it")
            if isinstance(item, ModelDelta):
                on_delta(item)
            elif isinstance(item, ModelResponse):
                response = item
            else:
                raise MalformedModelOutput(
                    f"stream() yielded {type(item).__name__}; expected ModelDelta pieces "
                    "and one final ModelResponse")
    finally:
        closing = getattr(source, "aclose", None)
        if closing is not None:
            await closing()
    if response is None:
        raise MalformedModelOutput("stream() ended without a ModelResponse (the completed turn)")
    return response


@functools.lru_cache(maxsize=256)
def _takes_settings(cls: type[Model]) -> bool:
    try:
        params = inspect.signature(cls.complete).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return False
    return any(p.name == "settings" or p.kind == p.VAR_KEYWORD for p in params)


async def call_model(model: Model, messages: Sequence[Message], tools: Sequence[ToolSpec],
                     settings: ModelSettings) -> ModelResponse:
    """``model.complete`` with ``settings`` when it accepts them (checked once per class)."""
    if _takes_settings(type(model)):
        return await model.complete(messages, tools, settings=settings)
    return await model.complete(messages, tools)


async def ask_model(model: Model, messages: Sequence[Message], tools: Sequence[ToolSpec],
                    settings: ModelSettings,
                    on_delta: Callable[[ModelDelta], None]) -> ModelResponse:
    """One model turn: streamed (each delta to ``on_delta``) when the model streams,
    ``complete`` otherwise; the completed turn either way."""
    if streams(model):
        return await stream_turn(model, messages, tools, settings, on_delta)
    return await call_model(model, messages, tools, settings)


def model_turn_index(messages: Sequence[Message]) -> int:
    """How many assistant turns precede this call: a replay-safe position in a script."""
    return [m.role for m in messages].count("assistant")


RetryHook = Callable[[int, BaseException, float], Awaitable[None]]

retry_hook: ContextVar[RetryHook | None] = ContextVar("alpaca_model_retry_hook", default=None)
"""Set by the runner around a model call, so a provider adapter that retries reports each
failed attempt into the run's journal without the model object knowing about runs (models
are shared by concurrent runs; a context variable follows each run's task)."""

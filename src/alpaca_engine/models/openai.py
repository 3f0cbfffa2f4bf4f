"""A Model backed by any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...).

The SDK's own retries are switched off (``max_retries=0``): retrying is done by our
``RetryPolicy`` through ``call_with_retry`` so every failed attempt is visible to ``on_retry``
(journal, audit) and backoff runs on the injectable ``Clock``. Every SDK failure leaves this
module as a ``ModelError`` whose ``transient`` flag drives that retry decision, and whose message
is scrubbed of the API key because provider error bodies sometimes echo it back.

It streams by default (``stream=True``: the runner calls :meth:`OpenAIModel.stream`): the
request carries ``stream_options.include_usage`` so usage comes from the stream's last
chunk, and a stream cut off part-way is a transient error, retried from the start like a
failed request (``stream_with_retry``). A typed agent's schema goes in ``response_format``
(see response_format.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import httpx
import httpx2
import openai
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionMessageParam,
    ChatCompletionToolUnionParam,
)

from ..clock import Clock
from ..telemetry.logging import register_secret
from ..tools.retry import OnRetry, RetryPolicy, call_with_retry, stream_with_retry
from .base import (
    Message,
    ModelError,
    ModelResponse,
    ModelSettings,
    StreamItem,
    ToolCall,
    ToolSpec,
    Usage,
    model_turn_index,
    retry_hook,
)
from .openai_stream import ChunkAccumulator
from .response_format import response_format, schema_instruction

DEFAULT_RETRY = RetryPolicy(max_attempts=3, initial_delay=0.5)

# Statuses worth another attempt: the same set the SDK itself would retry.
_TRANSIENT_STATUSES = frozenset({408, 409, 429})
# Body keys owned by this adapter; letting ``settings`` override them would silently change
# what the model is asked.
_RESERVED_SETTINGS = frozenset({"model", "messages", "tools", "stream", "stream_options"})
# Anything that looks like a bearer secret, in case a server echoes a key other than ours.
_SECRET_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,})")
_MAX_DETAIL = 500
# Local servers (vLLM, Ollama, llama.cpp) ignore auth, but the SDK insists on some key.
_NO_KEY_PLACEHOLDER = "unused"
# The request field that caps the answer: OpenAI's current name, and the older one that many
# OpenAI-compatible servers (and older OpenAI models) still expect instead.
CAP_PARAMS = ("max_completion_tokens", "max_tokens")


class OpenAIModel:
    """The ``Model`` protocol on ``openai.AsyncOpenAI`` chat completions with function tools."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        settings: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        http_client: httpx.AsyncClient | None = None,
        client: openai.AsyncOpenAI | None = None,
        on_retry: OnRetry | None = None,
        output_cap_param: str = "max_completion_tokens",
        stream: bool = True,
    ) -> None:
        reserved = _RESERVED_SETTINGS.intersection(settings or {})
        if reserved:
            raise ValueError(f"settings may not override {sorted(reserved)}")
        if output_cap_param not in CAP_PARAMS:
            raise ValueError(f"output_cap_param must be one of {', '.join(CAP_PARAMS)}")
        self._model = model
        self.streaming = stream
        """Whether the runner streams this model's turns (``stream``, the default)."""
        self._settings = dict(settings or {})
        # A cap written in settings keeps its field name and can only lower the engine's cap.
        self._output_cap_param = output_cap_param
        self._settings_cap: int | None = None
        for name in CAP_PARAMS:
            if name in self._settings:
                self._output_cap_param, self._settings_cap = name, self._settings[name]
        self._extra_body = {k: v for k, v in self._settings.items() if k not in CAP_PARAMS}
        self._retry = retry or DEFAULT_RETRY
        self._clock = clock
        self._on_retry = on_retry
        self._timeout = timeout
        self._secrets: list[str] = []

        if client is not None:
            # A caller-supplied client keeps its auth and URL; only its retries are taken away.
            self._client = client.with_options(max_retries=0)
            self._owns_client = False
            self._remember_secret(getattr(client, "api_key", None))
        else:
            base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
            key = api_key or os.environ.get("OPENAI_API_KEY") or None
            if key is None:
                if base_url is None:
                    raise ModelError(
                        "no API key: pass api_key or set OPENAI_API_KEY", transient=False
                    )
                key = _NO_KEY_PLACEHOLDER
            self._remember_secret(key)
            # The SDK accepts a legacy ``httpx.AsyncClient`` at runtime; its stubs name httpx2.
            self._client = openai.AsyncOpenAI(
                api_key=key,
                base_url=base_url,
                timeout=timeout,
                max_retries=0,
                http_client=cast(Any, http_client),
            )
            self._owns_client = http_client is None

    @property
    def name(self) -> str:
        return f"openai:{self._model}"

    async def aclose(self) -> None:
        """Close the connection pool, but only one this model created itself."""
        if self._owns_client:
            await self._client.close()

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        request = self._request(messages, tools, settings)

        async def attempt(_: int) -> ChatCompletion:
            return await self._create(request)

        try:
            completion = await call_with_retry(
                attempt,
                self._retry,
                is_transient=_is_transient,
                clock=self._clock,
                on_retry=self._retry_hook(),
            )
        except TimeoutError as exc:  # RetryPolicy.attempt_timeout fired on the last attempt
            raise ModelError(
                f"{self.name}: attempt timed out after {self._retry.attempt_timeout}s",
                transient=True,
            ) from exc
        return self._to_response(completion, model_turn_index(messages))

    async def stream(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> AsyncIterator[StreamItem]:
        """The turn as it is written, then the completed turn (see the module doc)."""
        request = self._request(messages, tools, settings)
        turn = model_turn_index(messages)
        estimate = sum(len(m.content or "") for m in messages) // 4 + 4 * len(messages)
        try:
            async for item in stream_with_retry(
                    lambda _: self._stream_attempt(request, turn, estimate), self._retry,
                    is_transient=_is_transient, clock=self._clock,
                    on_retry=self._retry_hook()):
                yield item
        except TimeoutError as exc:  # RetryPolicy.attempt_timeout fired on the last attempt
            raise ModelError(
                f"{self.name}: attempt timed out after {self._retry.attempt_timeout}s",
                transient=True,
            ) from exc

    async def _stream_attempt(self, request: dict[str, Any], turn: int,
                              estimate: int) -> AsyncIterator[StreamItem]:
        """One streamed HTTP attempt; every failure, mid-stream too, is a ``ModelError``."""
        try:
            chunks = await self._client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True})
        except openai.OpenAIError as exc:
            raise self._error(exc) from None
        acc = ChunkAccumulator(self.name, turn)
        try:
            if "json" in chunks.response.headers.get("content-type", ""):
                # A server that ignores ``stream`` answers with one plain completion.
                yield self._to_response(await self._plain(chunks.response), turn)
                return
            async for chunk in chunks:
                for delta in acc.add(chunk):
                    yield delta
        except (openai.OpenAIError, httpx.HTTPError, httpx2.HTTPError) as exc:
            raise self._error(exc) from None
        finally:
            await chunks.close()
        response = acc.response(estimate)
        if response.model is None:
            response = response.model_copy(update={"model": self._model})
        yield response

    async def _plain(self, response: Any) -> ChatCompletion:
        try:
            return ChatCompletion.model_validate_json(await response.aread())
        except ValueError as exc:
            raise ModelError(f"{self.name}: the server answered a stream request with a "
                             f"body that is not a completion ({str(exc).splitlines()[0]})",
                             transient=False) from None

    def _request(self, messages: Sequence[Message], tools: Sequence[ToolSpec],
                 settings: ModelSettings | None) -> dict[str, Any]:
        """The body of one chat-completions call (the same for streamed and plain ones)."""
        request_messages = [_message_to_param(m) for m in messages]
        cap = self._cap(settings)
        extra = dict(self._extra_body)
        native: dict[str, Any] | None = None
        schema = settings.output_schema if settings is not None else None
        if schema is not None and settings is not None:
            native = response_format(schema, settings.output_name)
            extra.pop("response_format", None)  # the agent's schema decides
            if native is None:
                request_messages.insert(0, cast(ChatCompletionMessageParam, {
                    "role": "system", "content": schema_instruction(schema)}))
        return {
            "model": self._model,
            "messages": request_messages,
            "tools": [_tool_to_param(t) for t in tools] or openai.omit,
            "max_completion_tokens": (cap if cap is not None and
                                      self._output_cap_param == "max_completion_tokens"
                                      else openai.omit),
            "max_tokens": (cap if cap is not None and self._output_cap_param == "max_tokens"
                           else openai.omit),
            "response_format": native if native is not None else openai.omit,
            "extra_body": extra or None,
        }

    def _cap(self, settings: ModelSettings | None) -> int | None:
        """The output-token cap to send: the engine's (the budget reserved for it), or the
        workflow's ``settings`` value when that is lower."""
        caps = [c for c in (settings.max_output_tokens if settings else None,
                            self._settings_cap) if c is not None]
        return min(caps) if caps else None

    async def _create(self, request: dict[str, Any]) -> ChatCompletion:
        """One HTTP attempt; every SDK failure leaves as a key-free ``ModelError``."""
        try:
            completion: ChatCompletion = await self._client.chat.completions.create(**request)
            return completion
        except openai.OpenAIError as exc:
            # ``from None``: the SDK exception may carry the raw body, which may echo the key.
            raise self._error(exc) from None

    def _error(self, exc: openai.OpenAIError | httpx.HTTPError | httpx2.HTTPError) -> ModelError:
        """An SDK failure as a key-free ``ModelError``, transient when worth retrying."""
        if isinstance(exc, httpx.HTTPError | httpx2.HTTPError):  # a body the SDK did not read
            return ModelError(f"{self.name}: connection failed: {self._redact(str(exc))}",
                              transient=True)
        if isinstance(exc, openai.APITimeoutError):
            return ModelError(f"{self.name}: request timed out after {self._timeout}s",
                              transient=True)
        if isinstance(exc, openai.APIConnectionError):
            return ModelError(f"{self.name}: connection failed: {self._redact(exc.message)}",
                              transient=True)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            return ModelError(f"{self.name}: HTTP {status}: {self._redact(exc.message)}",
                              transient=status in _TRANSIENT_STATUSES or status >= 500,
                              status=status)
        if isinstance(exc, openai.APIError):  # an error event inside a stream: the
            # provider failed mid-answer (its server errors arrive this way), worth a retry
            return ModelError(f"{self.name}: error mid-stream: {self._redact(exc.message)}",
                              transient=True)
        return ModelError(f"{self.name}: {type(exc).__name__}: {self._redact(str(exc))}",
                          transient=False)

    def _to_response(self, completion: ChatCompletion, turn: int) -> ModelResponse:
        choices = getattr(completion, "choices", None)
        if not choices:
            raise ModelError(f"{self.name}: response had no choices", transient=False)
        choice = choices[0]
        message = choice.message
        calls: list[ToolCall] = []
        for index, raw in enumerate(message.tool_calls or []):
            function = getattr(raw, "function", None)
            if function is None:
                raise ModelError(
                    f"{self.name}: unsupported tool call type {getattr(raw, 'type', None)!r}",
                    transient=False,
                )
            calls.append(
                ToolCall(
                    # Some local servers omit ids; a deterministic one keeps replays stable.
                    id=raw.id or f"call_{turn}_{index}",
                    name=function.name,
                    # Raw on purpose: malformed JSON is the runner's to reject, not ours.
                    arguments=function.arguments if function.arguments is not None else "{}",
                )
            )
        usage = Usage()
        if completion.usage is not None:
            usage = Usage(
                input_tokens=completion.usage.prompt_tokens or 0,
                output_tokens=completion.usage.completion_tokens or 0,
            )
        return ModelResponse(
            content=message.content,
            tool_calls=calls,
            usage=usage,
            model=completion.model or self._model,
            finish_reason=choice.finish_reason,
        )

    def _retry_hook(self) -> OnRetry | None:
        """The constructor's callback and the calling run's journal hook, whichever exist."""
        hooks = [h for h in (self._on_retry, retry_hook.get()) if h is not None]
        if len(hooks) < 2:
            return hooks[0] if hooks else None

        async def both(attempt: int, exc: BaseException, delay: float) -> None:
            for hook in hooks:
                await hook(attempt, exc, delay)

        return both

    def _remember_secret(self, key: object) -> None:
        if isinstance(key, str) and key and key != _NO_KEY_PLACEHOLDER:
            self._secrets.append(key)
            register_secret(key)  # log lines, audit records and tool results mask it too

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _SECRET_PATTERN.sub("***", text)
        if len(text) > _MAX_DETAIL:
            text = text[:_MAX_DETAIL] + "..."
        return text


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ModelError):
        return exc.transient
    return isinstance(exc, TimeoutError)  # from RetryPolicy.attempt_timeout


def _message_to_param(message: Message) -> ChatCompletionMessageParam:
    """Our Message to the chat-completions wire shape."""
    param: dict[str, Any]
    if message.role == "tool":
        if message.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        param = {
            "role": "tool",
            "tool_call_id": message.tool_call_id,
            "content": message.content or "",
        }
    elif message.role == "assistant":
        param = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            param["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in message.tool_calls
            ]
        elif message.content is None:
            param["content"] = ""
    else:
        param = {"role": message.role, "content": message.content or ""}
    if message.name is not None and message.role != "tool":
        param["name"] = message.name
    return cast(ChatCompletionMessageParam, param)


def _tool_to_param(tool: ToolSpec) -> ChatCompletionToolUnionParam:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }

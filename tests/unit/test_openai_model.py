"""OpenAIModel against the real openai SDK, faked only at the HTTP transport (no network)."""

from __future__ import annotations

import asyncio
import json
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from alpaca_engine.clock import FakeClock
from alpaca_engine.models.base import Message, Model, ModelError, ToolCall, ToolSpec
from alpaca_engine.models.openai import OpenAIModel
from alpaca_engine.tools.retry import RetryPolicy

API_KEY = "sk-test-SECRET-0123456789abcdef"
WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather for a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)

Reply = httpx.Response | Exception


def completion(
    *,
    content: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str = "stop",
    model: str = "gpt-test-2024",
    usage: dict[str, int] | None = None,
) -> httpx.Response:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        },
    )


def tool_call(
    arguments: str, call_id: str = "call_abc", name: str = "get_weather"
) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def error(status: int, message: str = "boom") -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "x", "code": None}})


class FakeServer:
    """Replies in order (the last one repeats) and records every request the SDK sent."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def body(self, index: int = -1) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.requests[index].content)
        return result

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self))


class RetryLog:
    def __init__(self) -> None:
        self.calls: list[tuple[int, BaseException, float]] = []

    async def __call__(self, attempt: int, exc: BaseException, delay: float) -> None:
        self.calls.append((attempt, exc, delay))


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(clock: FakeClock) -> Callable[..., OpenAIModel]:
    def factory(server: FakeServer, **kwargs: Any) -> OpenAIModel:
        kwargs.setdefault("api_key", API_KEY)
        kwargs.setdefault("clock", clock)
        return OpenAIModel("gpt-test", http_client=server.client(), **kwargs)

    return factory


USER = [Message(role="user", content="Weather in Paris?")]


async def test_tool_call_request_and_response(make: Callable[..., OpenAIModel]) -> None:
    server = FakeServer(
        completion(tool_calls=[tool_call('{"city": "Paris"}')], finish_reason="tool_calls")
    )
    model = make(server, settings={"temperature": 0.2, "max_tokens": 64})
    history = [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Weather in Rome?"),
        Message(
            role="assistant",
            tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city":"Rome"}')],
        ),
        Message(role="tool", tool_call_id="call_1", content='{"temp": 21}'),
        Message(role="assistant", content="21C in Rome."),
        Message(role="user", content="And Paris?"),
    ]

    response = await model.complete(history, [WEATHER])

    assert len(server.requests) == 1
    request = server.requests[0]
    assert request.method == "POST"
    assert request.url.path.endswith("/chat/completions")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    body = server.body()
    assert body["model"] == "gpt-test"
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 64
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21C in Rome."},
        {"role": "user", "content": "And Paris?"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city.",
                "parameters": WEATHER.parameters,
            },
        }
    ]

    assert response.content is None
    assert response.tool_calls == [
        ToolCall(id="call_abc", name="get_weather", arguments='{"city": "Paris"}')
    ]
    assert response.usage.input_tokens == 11
    assert response.usage.output_tokens == 7
    assert response.finish_reason == "tool_calls"
    assert response.model == "gpt-test-2024"


async def test_text_reply_without_tools_omits_tools_field(
    make: Callable[..., OpenAIModel],
) -> None:
    server = FakeServer(completion(content="Sunny."))
    response = await make(server).complete(USER, [])

    assert "tools" not in server.body()
    assert response.content == "Sunny."
    assert response.tool_calls == []
    assert response.finish_reason == "stop"


async def test_malformed_tool_arguments_are_kept_raw(make: Callable[..., OpenAIModel]) -> None:
    server = FakeServer(
        completion(tool_calls=[tool_call('{"city": "Par')], finish_reason="tool_calls")
    )
    response = await make(server).complete(USER, [WEATHER])

    assert response.tool_calls[0].arguments == '{"city": "Par'
    assert response.tool_calls[0].name == "get_weather"


async def test_missing_tool_call_ids_get_stable_ids(make: Callable[..., OpenAIModel]) -> None:
    server = FakeServer(
        completion(tool_calls=[tool_call("{}", call_id=""), tool_call("{}", call_id="")])
    )
    model = make(server)

    first = await model.complete(USER, [WEATHER])
    second = await model.complete(USER, [WEATHER])

    ids = [call.id for call in first.tool_calls]
    assert all(ids) and len(set(ids)) == 2
    assert ids == [call.id for call in second.tool_calls]


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_transient_status_is_retried_with_backoff(
    make: Callable[..., OpenAIModel], clock: FakeClock, status: int
) -> None:
    server = FakeServer(error(status), completion(content="ok"))
    log = RetryLog()

    response = await make(server, on_retry=log).complete(USER, [])

    assert response.content == "ok"
    assert len(server.requests) == 2
    assert len(clock.sleeps) == 1 and clock.sleeps[0] > 0
    assert len(log.calls) == 1
    attempt, exc, delay = log.calls[0]
    assert attempt == 1
    assert isinstance(exc, ModelError) and exc.transient and exc.status == status
    assert delay == clock.sleeps[0]


async def test_timeouts_retried_until_attempts_run_out(
    make: Callable[..., OpenAIModel], clock: FakeClock
) -> None:
    server = FakeServer(httpx.ReadTimeout("read timed out"))
    log = RetryLog()

    with pytest.raises(ModelError) as caught:
        await make(server, on_retry=log).complete(USER, [])

    assert caught.value.transient is True
    assert len(server.requests) == 3  # the default policy: three attempts
    assert len(clock.sleeps) == 2
    assert clock.sleeps[1] > clock.sleeps[0]  # exponential backoff
    assert [attempt for attempt, _, _ in log.calls] == [1, 2]


async def test_connection_error_is_transient(
    make: Callable[..., OpenAIModel], clock: FakeClock
) -> None:
    server = FakeServer(httpx.ConnectError("connection refused"), completion(content="ok"))

    response = await make(server).complete(USER, [])

    assert response.content == "ok"
    assert len(server.requests) == 2
    assert len(clock.sleeps) == 1


async def test_attempt_timeout_from_policy_is_transient(clock: FakeClock) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    model = OpenAIModel(
        "gpt-test",
        api_key=API_KEY,
        clock=clock,
        retry=RetryPolicy(max_attempts=2, attempt_timeout=0.01),
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(hang)),
    )
    with pytest.raises(ModelError) as caught:
        await model.complete(USER, [])

    assert caught.value.transient is True
    assert len(clock.sleeps) == 1


async def test_unauthorized_is_permanent_and_never_leaks_the_key(
    make: Callable[..., OpenAIModel], clock: FakeClock
) -> None:
    # Real providers echo (part of) the presented key back in the error body.
    server = FakeServer(error(401, f"Incorrect API key provided: {API_KEY}."))
    log = RetryLog()

    with pytest.raises(ModelError) as caught:
        await make(server, on_retry=log).complete(USER, [])

    err = caught.value
    assert err.transient is False
    assert err.status == 401
    assert len(server.requests) == 1
    assert clock.sleeps == [] and log.calls == []
    assert API_KEY not in str(err)
    assert API_KEY not in repr(err)
    assert API_KEY not in "".join(traceback.format_exception(err))


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_client_errors_are_not_retried(
    make: Callable[..., OpenAIModel], clock: FakeClock, status: int
) -> None:
    server = FakeServer(error(status))

    with pytest.raises(ModelError) as caught:
        await make(server).complete(USER, [])

    assert caught.value.transient is False
    assert caught.value.status == status
    assert len(server.requests) == 1
    assert clock.sleeps == []


async def test_response_without_choices_is_an_error(make: Callable[..., OpenAIModel]) -> None:
    empty = httpx.Response(
        200,
        json={"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": []},
    )
    with pytest.raises(ModelError, match="no choices"):
        await make(FakeServer(empty)).complete(USER, [])


async def test_base_url_is_honoured(make: Callable[..., OpenAIModel]) -> None:
    server = FakeServer(completion(content="hi"))

    await make(server, base_url="http://vllm.internal:8000/v1").complete(USER, [])

    url = server.requests[0].url
    assert (url.scheme, url.host, url.port) == ("http", "vllm.internal", 8000)
    assert url.path == "/v1/chat/completions"


async def test_env_supplies_key_and_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://ollama.local:11434/v1")
    server = FakeServer(completion(content="hi"))

    await OpenAIModel("llama3", http_client=server.client()).complete(USER, [])

    request = server.requests[0]
    assert request.url.host == "ollama.local"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"


async def test_local_server_needs_no_key() -> None:
    server = FakeServer(completion(content="hi"))
    model = OpenAIModel("llama3", base_url="http://localhost:8080/v1", http_client=server.client())

    response = await model.complete(USER, [])

    assert response.content == "hi"


def test_missing_key_for_hosted_api_fails_early() -> None:
    with pytest.raises(ModelError, match="OPENAI_API_KEY"):
        OpenAIModel("gpt-test")


async def test_supplied_client_does_not_retry_on_its_own(clock: FakeClock) -> None:
    server = FakeServer(error(500))
    # The SDK takes a legacy httpx client at runtime; its stubs only name httpx2.
    legacy: Any = server.client()
    sdk = openai.AsyncOpenAI(api_key=API_KEY, max_retries=5, http_client=legacy)
    model = OpenAIModel("gpt-test", client=sdk, clock=clock, retry=RetryPolicy(max_attempts=2))

    with pytest.raises(ModelError) as caught:
        await model.complete(USER, [])

    assert caught.value.transient is True
    assert len(server.requests) == 2  # our two attempts, none of the SDK's five
    assert API_KEY not in str(caught.value)


def test_settings_cannot_override_the_request() -> None:
    with pytest.raises(ValueError, match="model"):
        OpenAIModel("gpt-test", api_key=API_KEY, settings={"model": "other"})


def test_name_and_protocol() -> None:
    model = OpenAIModel("gpt-4o-mini", api_key=API_KEY)
    assert model.name == "openai:gpt-4o-mini"
    assert isinstance(model, Model)

"""OpenAIModel streaming and native JSON-schema output, through the real ``openai`` SDK.

The server is faked only at the HTTP transport, and it answers with real Server-Sent Event
bodies, byte for byte as OpenAI sends them (``data: {chunk}`` blocks, the usage chunk with
no choices, ``data: [DONE]``), including a body cut off part-way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from alpaca_engine.agents import Agent
from alpaca_engine.clock import FakeClock
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import (
    Message,
    ModelDelta,
    ModelError,
    ModelResponse,
    ModelSettings,
    ToolCall,
    ToolSpec,
    streams,
)
from alpaca_engine.models.openai import OpenAIModel
from alpaca_engine.tools.retry import RetryPolicy
from alpaca_engine.workflow import Workflow

API_KEY = "sk-test-STREAM-0123456789abcdef"
USER = [Message(role="user", content="Weather in Paris?")]
WEATHER = ToolSpec(name="get_weather", description="Current weather.", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, *,
          usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` as OpenAI sends it."""
    return {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-test-2024", "system_fingerprint": "fp_1",
            "choices": [] if delta is None else [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    body = "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


USAGE = {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}
TEXT_STREAM = sse(
    chunk({"role": "assistant", "content": "", "refusal": None}),
    chunk({"content": "It is "}), chunk({"content": "sunny "}), chunk({"content": "in Paris."}),
    chunk({}, "stop"),
    chunk(usage=USAGE))
TOOL_STREAM = sse(
    chunk({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_w1", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ty\": \"Par"}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "is\"}"}}]}),
    chunk({"tool_calls": [{"index": 1, "id": "call_w2", "type": "function",
                           "function": {"name": "get_weather", "arguments": "{\"city\""}}]}),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": \"Rome\"}"}}]}),
    chunk({}, "tool_calls"),
    chunk(usage={"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}))


class Cut(httpx.AsyncByteStream):
    """A body whose connection drops after ``head``: what httpx raises for a chunked
    response the peer closed early."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body "
            "(incomplete chunked read)")


def streamed(body: bytes | httpx.AsyncByteStream) -> httpx.Response:
    headers = {"content-type": "text/event-stream; charset=utf-8"}
    if isinstance(body, bytes):
        return httpx.Response(200, headers=headers, content=body)
    return httpx.Response(200, headers=headers, stream=body)


class Server:
    """Replies in order (the last repeats), recording each request body."""

    def __init__(self, *replies: httpx.Response) -> None:
        self.replies = list(replies)
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    def model(self, clock: FakeClock | None = None, **kw: Any) -> OpenAIModel:
        client = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return OpenAIModel("gpt-test", api_key=API_KEY, http_client=client,
                           clock=clock or FakeClock(), **kw)


async def collect(model: OpenAIModel, messages: list[Message] = USER,
                  tools: list[ToolSpec] | None = None,
                  settings: ModelSettings | None = None) -> tuple[list[ModelDelta], ModelResponse]:
    deltas: list[ModelDelta] = []
    final: list[ModelResponse] = []
    async for item in model.stream(messages, tools or [], settings=settings):
        (final if isinstance(item, ModelResponse) else deltas).append(item)  # type: ignore[arg-type]
    [response] = final
    return deltas, response


async def test_text_streams_and_usage_comes_from_the_last_chunk() -> None:
    server = Server(streamed(TEXT_STREAM))
    model = server.model()
    assert streams(model)  # streaming is the default for OpenAI
    deltas, response = await collect(model, settings=ModelSettings(max_output_tokens=64))

    body = server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 64  # the cap goes with a streamed request too
    assert [d.text for d in deltas] == ["It is ", "sunny ", "in Paris."]
    assert response.content == "It is sunny in Paris."
    assert (response.usage.input_tokens, response.usage.output_tokens) == (31, 9)
    assert response.finish_reason == "stop" and response.model == "gpt-test-2024"
    assert response.tool_calls == []


async def test_tool_call_arguments_split_across_chunks_are_accumulated_by_index() -> None:
    deltas, response = await collect(Server(streamed(TOOL_STREAM)).model(), tools=[WEATHER])

    assert response.tool_calls == [
        ToolCall(id="call_w1", name="get_weather", arguments='{"city": "Paris"}'),
        ToolCall(id="call_w2", name="get_weather", arguments='{"city": "Rome"}')]
    assert response.content is None and response.finish_reason == "tool_calls"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (50, 20)
    pieces = [d.tool_call for d in deltas if d.tool_call is not None]
    assert [(p.index, p.id, p.name) for p in pieces][:2] == [
        (0, "call_w1", "get_weather"), (0, None, None)]
    assert "".join(p.arguments for p in pieces if p.index == 0) == '{"city": "Paris"}'


async def test_a_stream_cut_off_midway_is_transient_and_retried_from_the_start() -> None:
    head = TEXT_STREAM[:TEXT_STREAM.index(b"sunny") + 20]  # two deltas, then the drop
    clock = FakeClock()
    server = Server(streamed(Cut(head)), streamed(TEXT_STREAM))
    retries: list[tuple[int, str]] = []

    async def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
        retries.append((attempt, str(exc)))

    model = server.model(clock, on_retry=on_retry,
                         retry=RetryPolicy(max_attempts=2, initial_delay=0.5, jitter=0))
    deltas, response = await collect(model)

    assert len(server.bodies) == 2 and clock.sleeps == [0.5]
    [(attempt, error)] = retries
    assert attempt == 1 and "connection failed" in error and API_KEY not in error
    # the first attempt's deltas came out before the cut; the second starts over
    assert [d.text for d in deltas] == ["It is ", "It is ", "sunny ", "in Paris."]
    assert response.content == "It is sunny in Paris."


async def test_a_body_that_ends_before_the_finish_is_truncated_and_fails_after_retries() -> None:
    truncated = sse(chunk({"content": "It is "}), chunk({"content": "sun"}), done=False)
    server = Server(streamed(truncated))
    model = server.model(retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0))
    with pytest.raises(ModelError) as caught:
        await collect(model)
    assert caught.value.transient and "stream ended before the model finished" in str(
        caught.value)
    assert len(server.bodies) == 3  # every attempt was made


async def test_an_error_status_before_the_stream_is_mapped_like_a_plain_request() -> None:
    server = Server(httpx.Response(401, json={"error": {"message": f"bad key {API_KEY}"}}))
    with pytest.raises(ModelError) as caught:
        await collect(server.model())
    assert caught.value.status == 401 and not caught.value.transient
    assert API_KEY not in str(caught.value)


async def test_a_server_ignoring_stream_answers_one_completion_that_is_still_read() -> None:
    server = Server(httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": "local",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "plain"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
    deltas, response = await collect(server.model())
    assert deltas == [] and response.content == "plain" and response.usage.input_tokens == 3


async def test_usage_missing_from_the_stream_is_estimated_not_zero() -> None:
    server = Server(streamed(sse(chunk({"content": "x" * 400}), chunk({}, "stop"))))
    _, response = await collect(server.model())
    assert response.usage.output_tokens >= 100 and response.usage.input_tokens > 0


def test_stream_false_turns_streaming_off() -> None:
    assert not streams(Server(streamed(TEXT_STREAM)).model(stream=False))


# -- through the runner: deltas, retries journaled, one completed message ------------------


async def test_the_runner_journals_the_completed_turn_and_emits_deltas_per_attempt(
        store: Any) -> None:
    head = TEXT_STREAM[:TEXT_STREAM.index(b"sunny") + 20]
    clock = FakeClock()
    server = Server(streamed(Cut(head)), streamed(TEXT_STREAM))
    model = server.model(clock, retry=RetryPolicy(max_attempts=3, initial_delay=0.5, jitter=0))
    events: list[dict[str, Any]] = []
    wf = Workflow(ref="t", agents={"a": Agent(name="a", model=model)})
    run = await Engine(store, lambda r: wf, clock=clock, emit=events.append).run(wf, "a", "hi")

    assert run.state == "succeeded" and run.output == "It is sunny in Paris."
    [step] = await store.list_steps(run.id)
    assert step.attempts == 2 and step.output["content"] == "It is sunny in Paris."
    assert step.output["usage"] == {"input_tokens": 31, "output_tokens": 9}
    audit = await store.list_audit(run.id)
    [retry] = [a.data for a in audit if a.kind == "model.retry"]
    assert retry["attempt"] == 1 and "connection failed" in retry["error"]
    ledger = await store.get_ledger(run.id)
    assert ledger.used["tokens"] == 40  # settled from the stream's usage chunk
    deltas = [e for e in events if e["type"] == "message.delta"]
    assert {e["step"] for e in deltas} == {1}
    first = [e for e in deltas if e["attempt"] == 1]
    second = [e for e in deltas if e["attempt"] == 2]
    assert first and [e["index"] for e in second] == list(range(len(second)))
    assert "".join(e["text"] for e in second) == "It is sunny in Paris."
    completed = next(i for i, e in enumerate(events) if e["type"] == "step.completed")
    assert events.index(deltas[-1]) < completed  # every delta before the completed turn
    # nothing of a delta is journaled: no audit record or step holds the pieces
    assert not [a for a in audit if "delta" in a.kind]


async def test_deltas_are_redacted_even_when_a_secret_is_split_across_chunks(
        store: Any) -> None:
    secret_stream = sse(chunk({"content": "the key is sk-live"}),
                        chunk({"content": "ABCDEFGH12345 and "}),
                        chunk({"content": "that is all"}), chunk({}, "stop"), chunk(usage=USAGE))
    model = Server(streamed(secret_stream)).model()
    events: list[dict[str, Any]] = []
    wf = Workflow(ref="t", agents={"a": Agent(name="a", model=model)})
    run = await Engine(store, lambda r: wf, emit=events.append).run(wf, "a", "hi")
    shown = "".join(e["text"] for e in events if e["type"] == "message.delta")
    assert "ABCDEFGH" not in shown and "sk-live" not in shown
    assert shown == run.output == "the key is *** and that is all"


# -- typed outputs: the schema goes in response_format -------------------------------------


DECISION = {"type": "object", "additionalProperties": False,
            "required": ["decision", "confidence"],
            "properties": {"decision": {"type": "string", "enum": ["GO", "NO-GO"]},
                           "confidence": {"type": "number"}}}


async def test_a_typed_agent_asks_for_strict_json_schema_output(store: Any) -> None:
    answer = json.dumps({"decision": "GO", "confidence": 0.8})
    server = Server(streamed(sse(chunk({"content": answer}), chunk({}, "stop"),
                                 chunk(usage=USAGE))))
    wf = Workflow(ref="t", agents={"decider": Agent(name="decider", model=server.model(),
                                                    output_schema=DECISION)})
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go?")

    assert server.bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "decider", "schema": DECISION, "strict": True}}
    assert run.state == "succeeded" and run.output_type == "json"
    assert run.value == {"decision": "GO", "confidence": 0.8}


async def test_a_schema_strict_mode_cannot_take_is_sent_non_strict() -> None:
    loose = {"type": "object", "properties": {"n": {"type": "integer"}}}  # open, optional
    server = Server(streamed(sse(chunk({"content": '{"n": 1}'}), chunk({}, "stop"))))
    await collect(server.model(), settings=ModelSettings(output_schema=loose, output_name="x y"))
    assert server.bodies[0]["response_format"]["json_schema"] == {
        "name": "x_y", "schema": loose, "strict": False}


async def test_a_non_object_schema_is_told_in_a_system_message_not_response_format() -> None:
    server = Server(streamed(sse(chunk({"content": "[1, 2]"}), chunk({}, "stop"))))
    schema = {"type": "array", "items": {"type": "integer"}}
    await collect(server.model(),
                  settings=ModelSettings(output_schema=schema))
    body = server.bodies[0]
    assert "response_format" not in body
    assert body["messages"][0]["role"] == "system"
    assert '"type": "array"' in body["messages"][0]["content"]
    assert body["messages"][1:] == [{"role": "user", "content": "Weather in Paris?"}]


async def test_the_plain_path_sends_the_schema_too() -> None:
    server = Server(httpx.Response(200, json={
        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": '{"decision":"GO"}'}}]}))
    model = server.model(stream=False)
    await model.complete(USER, [], settings=ModelSettings(output_schema=DECISION))
    assert "stream" not in server.bodies[0]
    assert server.bodies[0]["response_format"]["json_schema"]["strict"] is True

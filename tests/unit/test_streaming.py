"""Streaming model turns (DESIGN §10): deltas out as ``message.delta`` events, only the
completed turn in the journal, the same turn as without streaming."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from alpaca_engine.api.events import DeltaGate
from alpaca_engine.coord.local import LocalEventBus
from alpaca_engine.coord.outbox import Outbox
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import (
    Message,
    ModelDelta,
    ModelResponse,
    ModelSettings,
    ToolSpec,
    streams,
)
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.telemetry.audit import AuditRecord
from alpaca_engine.telemetry.logging import clear_secrets, redact_text, register_secret
from alpaca_engine.telemetry.stream_redaction import StreamRedactor
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.retry import RetryPolicy, stream_with_retry
from alpaca_engine.workflows.loader import load_workflow_text
from tests.helpers import workflow

ANSWER = "The launch is ready: contracts signed, support staffed, tests passed."


@tool
def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city}: sunny"


SCRIPT: list[Any] = [{"tool": "lookup", "args": {"city": "Paris, the capital of France"}},
                     ANSWER]


async def run_with_events(store: Any, model: Any) -> tuple[Any, list[dict[str, Any]]]:
    wf = workflow(model, [lookup])
    events: list[dict[str, Any]] = []
    run = await Engine(store, lambda r: wf, emit=events.append).run(wf, "agent", "go")
    return run, events


def deltas_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "message.delta"]


async def test_a_streamed_run_journals_exactly_what_an_unstreamed_one_does(store) -> None:
    plain, plain_events = await run_with_events(store, ScriptedModel(SCRIPT))
    streamed, events = await run_with_events(
        store, ScriptedModel(SCRIPT, stream=True, chunk_size=5))
    assert deltas_of(events)

    assert deltas_of(plain_events) == []  # an offline model streams only when asked
    assert streamed.output == plain.output == ANSWER
    plain_steps = await store.list_steps(plain.id)
    steps = await store.list_steps(streamed.id)
    # same turns, same conversation digests, same usage: deltas change nothing durable
    assert [(s.kind, s.input.get("digest"), s.output) for s in steps] == [
        (s.kind, s.input.get("digest"), s.output) for s in plain_steps]
    assert [a.kind for a in await store.list_audit(streamed.id)] == [
        a.kind for a in await store.list_audit(plain.id)]


async def test_deltas_follow_the_contract_and_come_before_their_step_completes(store) -> None:
    run, events = await run_with_events(store, ScriptedModel(SCRIPT, stream=True, chunk_size=7))
    deltas = deltas_of(events)
    assert all(set(d) in ({"type", "run_id", "step", "attempt", "index", "text"},
                          {"type", "run_id", "step", "attempt", "index", "tool_call"})
               for d in deltas)
    assert {d["run_id"] for d in deltas} == {run.id} and {d["attempt"] for d in deltas} == {1}
    by_step: dict[int, list[dict[str, Any]]] = {}
    for d in deltas:
        by_step.setdefault(d["step"], []).append(d)
    assert sorted(by_step) == [1, 3]  # the two model steps (step 2 is the tool)
    for step, pieces in by_step.items():
        assert [p["index"] for p in pieces] == list(range(len(pieces)))
        completed = next(i for i, e in enumerate(events)
                         if e["type"] == "step.completed" and e["seq"] == step)
        assert events.index(pieces[-1]) < completed
    calls = [p["tool_call"] for p in by_step[1]]
    assert calls[0]["id"] == "call_0_0" and calls[0]["name"] == "lookup"
    assert "".join(c["arguments"] for c in calls) == '{"city": "Paris, the capital of France"}'
    assert "".join(p["text"] for p in by_step[3]) == ANSWER


async def test_a_function_model_streams_with_a_delay(store) -> None:
    def answer(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> str:
        return "one two three"

    model = FunctionModel(answer, stream=True, chunk_size=4, delay=0.01)
    run, events = await run_with_events(store, model)
    assert [d["text"] for d in deltas_of(events)] == ["one ", "two ", "three"]
    assert run.output == "one two three"


async def test_yaml_turns_streaming_on_for_offline_models(store, tmp_path: Path) -> None:
    wf = load_workflow_text("""
version: 1
agents:
  - name: a
    model: {provider: scripted, stream: true, chunk_size: 3, delay: 0, script: ["ab cd efg"]}
  - name: b
    model: {provider: scripted, script: ["abcdefg"]}
  - name: c
    model: {provider: openai, model: gpt-x, base_url: "http://127.0.0.1:9/v1", stream: false}
""", base_dir=tmp_path)
    assert streams(wf.agents["a"].model) and not streams(wf.agents["b"].model)
    assert not streams(wf.agents["c"].model)
    events: list[dict[str, Any]] = []
    await Engine(store, lambda r: wf, emit=events.append).run(wf, "a", "go")
    assert [d["text"] for d in deltas_of(events)] == ["ab ", "cd ", "efg"]


class Streamer:
    """A hand-written streaming model (the protocol for custom models)."""

    name = "custom"

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    async def complete(self, messages: Sequence[Message], tools: Sequence[ToolSpec],
                       settings: ModelSettings | None = None) -> ModelResponse:
        raise AssertionError("a streaming model is streamed")

    async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec],
                     settings: ModelSettings | None = None) -> AsyncIterator[Any]:
        for item in self.items:
            yield item


@pytest.mark.parametrize(("items", "problem"), [
    ([ModelDelta(text="hal")], "ended without a ModelResponse"),
    ([ModelDelta(text="x"), "not a delta"], "yielded str"),
    ([ModelResponse(content="a"), ModelDelta(text="b")], "more after its ModelResponse"),
])
async def test_a_malformed_stream_fails_the_step_clearly(store, items: list[Any],
                                                         problem: str) -> None:
    run, _ = await run_with_events(store, Streamer(items))
    assert run.state == "failed" and run.error_code == "malformed_model_output"
    assert problem in (run.error_message or "")
    [step] = await store.list_steps(run.id)
    assert step.status == "failed"


async def test_a_turn_that_crashed_mid_stream_is_asked_again_on_resume(store) -> None:
    class Crash(asyncio.CancelledError):
        pass

    crashed = {"armed": True}

    class Dies(Streamer):
        async def stream(self, messages: Sequence[Message], tools: Sequence[ToolSpec],
                         settings: ModelSettings | None = None) -> AsyncIterator[Any]:
            yield ModelDelta(text="half ")
            await asyncio.sleep(0)
            if crashed["armed"]:
                crashed["armed"] = False
                raise Crash()
            yield ModelDelta(text="whole")
            yield ModelResponse(content="half whole")

    wf = workflow(Dies([]), [])
    events: list[dict[str, Any]] = []
    first = Engine(store, lambda r: wf, emit=events.append, owner="host:1:a")
    submitted = await first.submit(wf, "agent", "go")
    with pytest.raises(Crash):
        await first.execute(submitted.id)
    [step] = await store.list_steps(submitted.id)
    assert step.status == "started"  # nothing of the half turn was journaled
    second = Engine(store, lambda r: wf, emit=events.append, owner="host:2:b")
    done = await second.resume(submitted.id, force=True)
    assert done.output == "half whole"
    # the client sees the stream restart: index 0 of the same step again
    assert [(d["step"], d["index"], d["text"]) for d in deltas_of(events)] == [
        (1, 0, "half "), (1, 0, "half "), (1, 1, "whole")]


# -- to the event bus: in order, bounded, never waited for ---------------------------------


async def test_the_engine_publishes_deltas_to_the_bus_in_order(store) -> None:
    bus = LocalEventBus()
    wf = workflow(ScriptedModel([ANSWER], stream=True, chunk_size=2), [])
    engine = Engine(store, lambda r: wf, events=bus)
    received: list[dict[str, Any]] = []

    async def listen() -> None:
        async for event in bus.subscribe("*"):
            received.append(event)
            if event["type"] == "run.finished":
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0)
    run = await engine.run(wf, "agent", "go")
    assert engine.outbox is not None
    await engine.outbox.flush()
    await asyncio.wait_for(listener, 30)
    texts = [e["text"] for e in received if e["type"] == "message.delta"]
    assert "".join(texts) == run.output and len(texts) > 5
    assert [e["index"] for e in received if e["type"] == "message.delta"] == list(
        range(len(texts)))


class SlowBus:
    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.gate = asyncio.Event()

    async def publish(self, run_id: str, event: dict[str, Any]) -> None:
        await self.gate.wait()
        self.got.append(event)

    def subscribe(self, run_id: str, *, tree: bool = False) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError


async def test_a_stuck_bus_never_blocks_and_a_full_outbox_drops_the_newest() -> None:
    bus = SlowBus()
    outbox = Outbox(bus, limit=5)
    for i in range(8):
        outbox.put({"run_id": "r", "index": i})  # returns at once though nothing is sent
    assert outbox.dropped == 3
    bus.gate.set()
    await asyncio.wait_for(outbox.flush(), 30)
    assert [e["index"] for e in bus.got] == [0, 1, 2, 3, 4]
    outbox.put({"run_id": "r", "index": 9})  # room again, and a new drain
    await asyncio.wait_for(outbox.flush(), 30)
    assert bus.got[-1]["index"] == 9


async def test_a_failing_bus_loses_events_quietly() -> None:
    class Broken(SlowBus):
        async def publish(self, run_id: str, event: dict[str, Any]) -> None:
            raise ConnectionError("redis is gone")

    outbox = Outbox(Broken())
    outbox.put({"run_id": "r"})
    await asyncio.wait_for(outbox.flush(), 30)


# -- redaction of pieces ---------------------------------------------------------------------


@pytest.fixture
def secret() -> Any:
    register_secret("hunter2-the-password")
    yield "hunter2-the-password"
    clear_secrets()


def test_a_secret_split_anywhere_is_still_masked(secret: str) -> None:
    text = (f"config: user=admin pass={secret} token sk-abcDEF1234567890xyz then "
            "Authorization: Bearer abcdefghijklmnop1234 and the end")
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        redactor = StreamRedactor()
        shown = "".join(redactor.feed(p) for p in pieces) + redactor.flush()
        assert shown == redact_text(text), pieces
        assert secret not in shown and "abcDEF" not in shown and "abcdefghijklmnop" not in shown


def test_a_long_word_in_many_pieces_is_held_whole_and_masked(secret: str) -> None:
    """A key or blob far longer than a piece: held back until it ends, then masked as the
    whole text would be (the word is not rescanned per piece)."""
    key = "sk-" + "Ab1" * 20_000
    text = f"here: {key} and {secret} end"
    redactor = StreamRedactor()
    shown = []
    for i in range(0, len(text), 7):
        shown.append(redactor.feed(text[i:i + 7]))
    shown.append(redactor.flush())
    assert "".join(shown) == redact_text(text)
    assert all("Ab1Ab1" not in piece for piece in shown) and secret not in "".join(shown)


def test_ordinary_prose_is_held_back_by_one_word_at_most() -> None:
    redactor = StreamRedactor()
    assert redactor.feed("Hello") == ""
    assert redactor.feed(" wor") == "Hello "
    assert redactor.feed("ld, how") == "world, "
    assert redactor.flush() == "how"


# -- which deltas an SSE stream may still send -----------------------------------------------


def record(kind: str, seq: int, **data: Any) -> AuditRecord:
    return AuditRecord(run_id="r", seq=seq, time="t", actor="engine", kind=kind, data=data,
                       prev_hash="0", hash="1")


def test_a_delta_after_its_steps_record_is_stale() -> None:
    gate = DeltaGate()

    def fresh(step: int, attempt: int = 1, run_id: str = "r") -> bool:
        delta = {"type": "message.delta", "run_id": run_id, "step": step,
                 "attempt": attempt, "index": 0, "text": "x"}
        return bool(list(gate.fresh([delta])))

    assert fresh(1)
    gate.saw("r", record("budget.reserved", 1, step=1))
    assert fresh(1)  # the step started, not finished
    gate.saw("r", record("model.retry", 2, step=1, attempt=1))
    assert not fresh(1, attempt=1) and fresh(1, attempt=2)
    gate.saw("r", record("model.output", 3, step=1))
    assert not fresh(1, attempt=2) and fresh(3)
    gate.saw("r", record("gate.permission_allowed", 4, step=4))
    assert not fresh(3) and fresh(5) and fresh(1, run_id="r.2")
    gate.saw("r", record("state.changed", 5, to="succeeded"))
    assert not fresh(99)
    assert list(gate.fresh([{"type": "message.delta", "run_id": "x"}])) == []  # malformed


async def test_stream_with_retry_restarts_a_cut_stream() -> None:
    attempts: list[int] = []

    async def source(attempt: int) -> AsyncIterator[int]:
        attempts.append(attempt)
        yield 1
        if attempt == 1:
            raise ConnectionError("cut")
        yield 2

    retried: list[int] = []

    async def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
        retried.append(attempt)

    got = [i async for i in stream_with_retry(source, RetryPolicy(max_attempts=2,
                                                                  initial_delay=0),
                                             on_retry=on_retry)]
    assert got == [1, 1, 2] and attempts == [1, 2] and retried == [1]

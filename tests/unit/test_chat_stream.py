"""``engine.chat_stream``: a turn's answer arrives in pieces while the turn runs (from the
event bus the runner publishes to), the stream ends with the turn and holds its run; closed
early, the turn goes back to the queue and ``chat_stream(thread_id)`` finishes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from alpaca_engine import ChatDelta, ChatStep, Engine, FunctionModel
from alpaca_engine.errors import NotFound
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.decorator import tool
from tests.helpers import workflow

ANSWER = "Paris is sunny today, and so is the rest of France, mostly."


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"{city}: sunny"


def model(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    if messages[-1].role == "tool":
        return ANSWER
    return {"tool": "weather", "args": {"city": "Paris"}}


def slow_engine(store: SQLiteStore, delay: float = 0.02) -> Engine:
    wf = workflow(FunctionModel(model, stream=True, chunk_size=4, delay=delay), [weather])
    return Engine(store, lambda ref: wf)


async def test_pieces_arrive_before_the_turn_ends_and_the_run_after(store: SQLiteStore) -> None:
    engine = slow_engine(store)
    thread = await engine.create_thread(agent="agent", workflow=engine.resolve("test"))
    stream = engine.chat_stream(thread.id, "weather in Paris?", steps=True)
    pieces: list[ChatDelta | ChatStep] = []
    states: list[RunState] = []
    async for piece in stream:
        pieces.append(piece)
        assert stream.run_id is not None
        states.append((await store.get_run(stream.run_id)).state)
    deltas = [p for p in pieces if isinstance(p, ChatDelta)]
    first = pieces.index(deltas[0])
    assert len(deltas) > 3 and states[first] == RunState.RUNNING  # while the turn runs
    assert "".join(d.text for d in deltas) == ANSWER
    [step] = [p for p in pieces if isinstance(p, ChatStep)]
    assert (step.kind, step.name, step.result) == ("tool", "weather", "Paris: sunny")
    assert pieces.index(step) < pieces.index(deltas[0])  # in the order they happened
    run = stream.run
    assert run is not None and run.state == RunState.SUCCEEDED
    assert (run.id, run.turn, run.output) == (stream.run_id, 1, ANSWER)

    plain = engine.chat_stream(thread.id, "and tomorrow?")
    texts = [piece async for piece in plain]
    assert all(isinstance(p, ChatDelta) for p in texts)  # no steps unless asked
    assert plain.run is not None and plain.run.turn == 2


async def test_closed_early_the_turn_is_handed_back_and_continues(store: SQLiteStore) -> None:
    engine = slow_engine(store, delay=0.05)
    thread = await engine.create_thread(agent="agent", workflow=engine.resolve("test"))
    stream = engine.chat_stream(thread.id, "weather in Paris?")
    async for piece in stream:
        assert isinstance(piece, ChatDelta)
        break
    await stream.aclose()
    assert stream.run_id is not None
    left = await store.get_run(stream.run_id)
    assert left.state == RunState.QUEUED and left.lease_owner is None

    rest = engine.chat_stream(thread.id)  # no text: the unfinished last turn
    async for _piece in rest:
        pass
    assert rest.run is not None and rest.run.id == left.id
    assert (rest.run.state, rest.run.output) == (RunState.SUCCEEDED, ANSWER)
    with pytest.raises(ValueError, match="no unfinished turn"):
        async for _piece in engine.chat_stream(thread.id):
            pass


async def test_an_unknown_thread_raises_at_the_first_piece(store: SQLiteStore) -> None:
    engine = slow_engine(store)
    with pytest.raises(NotFound):
        async for _piece in engine.chat_stream("thr_0000000000000000", "hi"):
            pass

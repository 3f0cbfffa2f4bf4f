"""The history of a thread as pure logic: which earlier turns are sent, and the journal walk
that rebuilds each one (history.py, journal.replayed_messages)."""

from __future__ import annotations

from alpaca_engine.agents import HistoryPolicy
from alpaca_engine.history import PastTurn, build, past_turn
from alpaca_engine.journal import replayed_messages
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.base import Message, ModelResponse, ToolCall
from alpaca_engine.store.records import RunRecord, StepKind, StepRecord, StepStatus


def turn(n: int, chars: int = 40, state: RunState = RunState.SUCCEEDED) -> PastTurn:
    messages = (Message(role="user", content="u" * chars),
                Message(role="assistant", content=f"answer {n}"))
    return PastTurn(turn=n, run_id=f"r{n}", state=state,
                    messages=messages if state == RunState.SUCCEEDED else ())


def model_step(seq: int, response: ModelResponse, status: StepStatus = StepStatus.COMPLETED
               ) -> StepRecord:
    return StepRecord(run_id="r", seq=seq, kind=StepKind.MODEL, name="m", status=status,
                      output=response.model_dump())


def tool_step(seq: int, output: object = None, error: dict[str, object] | None = None,
              status: StepStatus = StepStatus.COMPLETED) -> StepRecord:
    return StepRecord(run_id="r", seq=seq, kind=StepKind.TOOL, name="t", status=status,
                      output=output, error=error)


def test_without_bounds_every_succeeded_turn_is_sent_in_order() -> None:
    history = build([turn(1), turn(2), turn(3)], HistoryPolicy())
    assert history.turns == [1, 2, 3] and history.left_out == []
    assert [m.content for m in history.messages if m.role == "assistant"] == [
        "answer 1", "answer 2", "answer 3"]


def test_unfinished_business_and_bounds_leave_out_whole_turns_oldest_first() -> None:
    turns = [turn(1), turn(2, state=RunState.FAILED), turn(3), turn(4, state=RunState.CANCELLED),
             turn(5), turn(6)]
    history = build(turns, HistoryPolicy(max_turns=2))
    assert history.turns == [5, 6]
    assert [(x.turn, x.reason) for x in history.left_out] == [
        (1, "max_turns"), (2, "failed"), (3, "max_turns"), (4, "cancelled")]
    assert build(turns, HistoryPolicy(max_turns=0)).turns == []


def test_max_tokens_keeps_a_recent_window_that_fits_and_nothing_older() -> None:
    small, big = turn(1, chars=4), turn(2, chars=4000)
    history = build([small, big, turn(3, chars=4)], HistoryPolicy(max_tokens=50))
    # turn 2 does not fit, so turn 1 is left out too: never a gap in what the model sees
    assert history.turns == [3]
    assert [(x.turn, x.reason) for x in history.left_out] == [(1, "max_tokens"),
                                                              (2, "max_tokens")]
    assert history.tokens == turn(3, chars=4).tokens <= 50
    data = history.audit_data(HistoryPolicy(max_tokens=50))
    assert data["sent_turns"] == [3] and data["dropped"][1]["tokens"] == big.tokens


def test_the_choice_is_deterministic() -> None:
    turns = [turn(n, chars=10 * n) for n in range(1, 8)]
    policy = HistoryPolicy(max_turns=4, max_tokens=80)
    first, again = build(turns, policy), build(list(reversed(turns)), policy)
    assert first.messages == again.messages and first.left_out == again.left_out


def test_a_turn_is_rebuilt_from_its_journal_as_the_model_saw_it() -> None:
    call = ToolCall(id="c1", name="t", arguments='{"x": 1}')
    steps = [model_step(1, ModelResponse(content="thinking", tool_calls=[call])),
             tool_step(2, error={"code": "tool_error", "message": "boom"}),
             model_step(3, ModelResponse(content="done"))]
    messages = replayed_messages(steps)
    assert [(m.role, m.content) for m in messages] == [
        ("assistant", "thinking"), ("tool", '{"error": {"code": "tool_error", '
                                            '"message": "boom"}}'), ("assistant", "done")]
    assert messages[0].tool_calls == [call] and messages[1].tool_call_id == "c1"
    run = RunRecord(id="r", agent="a", workflow="w", input="hello", state=RunState.SUCCEEDED,
                    turn=4)
    past = past_turn(run, steps)
    assert past.turn == 4 and past.messages[0] == Message(role="user", content="hello")
    assert past_turn(run.model_copy(update={"state": RunState.FAILED}), steps).messages == ()


def test_a_model_turn_whose_tool_calls_did_not_all_finish_is_not_replayed() -> None:
    calls = [ToolCall(id="a", name="t"), ToolCall(id="b", name="t")]
    steps = [model_step(1, ModelResponse(content=None, tool_calls=calls[:1])), tool_step(2, "ok"),
             model_step(3, ModelResponse(tool_calls=calls)), tool_step(4, "ok"),
             tool_step(5, status=StepStatus.STARTED)]
    assert [m.role for m in replayed_messages(steps)] == ["assistant", "tool"]
    assert replayed_messages([model_step(1, ModelResponse(content="x"),
                                         StepStatus.FAILED)]) == []

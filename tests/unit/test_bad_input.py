"""Bad input in the runner is a clear error or a clean replacement, never ``internal_error``.

Lone surrogates (text UTF-8 cannot hold; SQLite, psycopg and the audit hash all refuse it)
become U+FFFD wherever they enter: model text, tool arguments, results and error text.
Arguments nested beyond 64 levels are ``invalid_arguments`` naming the limit; a scripted or
function model answering with something that is not a turn is ``malformed_model_output``
naming what was expected. tests/failure_paths.py checks that each of these ends recorded,
on SQLite (tests/unit/test_failure_invariant.py) and PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from alpaca_engine.errors import UnstorableText
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.contracts import MAX_NESTING, parse_arguments
from alpaca_engine.tools.decorator import tool
from tests.failure_paths import DEEP_ARRAY, DEEP_OBJECT
from tests.helpers import engine, workflow

received: list[str] = []


@tool
def echo(text: str) -> str:
    """Return the text."""
    received.append(text)
    return text


def told(model: ScriptedModel) -> list[Any]:
    return [json.loads(m.content or "null") for m in model.calls[-1] if m.role == "tool"]


@pytest.mark.parametrize(("text", "code"), [("a\udcff b", "invalid_unicode"),
                                             ("a\x00b", "nul_character")])
async def test_input_no_store_can_keep_is_refused_before_anything_is_stored(
        store, text: str, code: str) -> None:
    """The API's 422 for the CLI and Python too: stdin's undecodable bytes arrive as lone
    surrogates (surrogateescape), which no store can encode."""
    wf = workflow(["never asked"], [echo])
    with pytest.raises(UnstorableText) as refused:
        await engine(store, wf).run(wf, "agent", text)
    assert refused.value.code == code and "index 1" in refused.value.message
    assert await store.list_runs(limit=10) == []


async def test_a_lone_surrogate_in_model_text_is_replaced(store) -> None:
    wf = workflow(FunctionModel(lambda m, t: "half \ud800 pair"), [echo])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded" and run.output == "half \ufffd pair"
    [step] = await store.list_steps(run.id)
    assert step.output["content"] == "half \ufffd pair"


@pytest.mark.parametrize("raw", ['{"text": "a\\ud800b"}', '{"text": "a\ud800b"}'],
                         ids=["json_escape", "raw_character"])
async def test_a_lone_surrogate_in_tool_arguments_is_replaced(store, raw: str) -> None:
    received.clear()
    model = ScriptedModel([{"tool": "echo", "args": raw}, "ok"])
    wf = workflow(model, [echo])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded"
    assert received == ["a\ufffdb"] and told(model) == ["a\ufffdb"]
    assert (await store.list_steps(run.id))[1].input["args"] == {"text": "a\ufffdb"}


async def test_a_lone_surrogate_in_a_result_or_an_error_is_replaced(store) -> None:
    @tool
    def result() -> str:
        return "out \udcff"

    @tool
    def failure() -> str:
        raise ValueError("in \udcff error")

    model = ScriptedModel([{"calls": [{"tool": "result"}, {"tool": "failure"}]}, "ok"])
    wf = workflow(model, [result, failure])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded"
    assert told(model) == ["out \ufffd", {"error": {
        "code": "tool_error", "message": "ValueError: in \ufffd error"}}]


@pytest.mark.parametrize("raw", [DEEP_ARRAY, DEEP_OBJECT, '{"x": ' + DEEP_ARRAY + "}"],
                         ids=["arrays", "objects", "inside_an_object"])
async def test_arguments_nested_10000_deep_are_invalid_arguments(store, raw: str) -> None:
    received.clear()
    model = ScriptedModel([{"tool": "echo", "args": raw}, "ok"])
    wf = workflow(model, [echo])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded" and received == []
    [result] = told(model)
    assert result["error"]["code"] == "invalid_arguments"
    assert f"the limit is {MAX_NESTING}" in result["error"]["message"]


def test_the_nesting_limit_is_exact() -> None:
    at_limit = "[" * MAX_NESTING + "]" * MAX_NESTING
    over = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    assert parse_arguments('{"a": ' + at_limit[2:-2] + "}") [1] is None
    assert parse_arguments('{"a": ' + over[1:-1] + "}")[1] is not None
    many_flat = '{"a": [' + ",".join(["[]"] * 500) + "]}"  # many brackets, shallow
    assert parse_arguments(many_flat)[1] is None


async def test_a_result_nested_too_deep_is_invalid_output(store) -> None:
    @tool
    def deep():  # type: ignore[no-untyped-def]  # no contract: the runner sees the value
        value: list[Any] = []
        for _ in range(10_000):
            value = [value]
        return value

    model = ScriptedModel([{"tool": "deep"}, "ok"])
    wf = workflow(model, [deep])
    await engine(store, wf).run(wf, "agent", "go")
    [result] = told(model)
    assert result["error"]["code"] == "invalid_output"
    assert f"the limit is {MAX_NESTING}" in result["error"]["message"]


@pytest.mark.parametrize(("answer", "names"), [
    (42, "got int 42"),
    ({"answer": "yes"}, "a mapping without 'tool' or 'calls' (keys: answer)"),
    (["a", "b"], "got list"),
    ({"calls": "add"}, "'calls' is str"),
    ({"calls": [{"args": {}}]}, "tool call 0 is a mapping; expected a mapping with a string"),
    ({"tool": "echo", "usage": {"input_tokens": "many"}}, "'usage' a mapping"),
], ids=["int", "dict_without_tool", "list", "calls_not_a_list", "call_without_tool",
        "bad_usage"])
async def test_malformed_model_output_names_what_was_expected(store, answer: Any,
                                                              names: str) -> None:
    wf = workflow(FunctionModel(lambda m, t: answer), [echo])
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "failed" and run.error_code == "malformed_model_output"
    assert names in (run.error_message or "")
    assert "expected" in (run.error_message or "")
    [step] = await store.list_steps(run.id)
    assert step.status == "failed" and step.error["code"] == "malformed_model_output"

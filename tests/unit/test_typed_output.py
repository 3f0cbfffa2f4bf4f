"""Typed outputs (DESIGN §10): an agent's final answer must match its output schema.

A violation goes back to the model as a correction (journaled with the answer, audited
``output.invalid``), up to ``output_retries``; then the run fails ``invalid_output`` with
the validator's message. A typed run's output is JSON: ``output_type`` says so, the API,
the CLI ``--json`` and a delegating parent get the parsed value.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from alpaca_engine.agents import Agent
from alpaca_engine.api.models import Run
from alpaca_engine.cli import app
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.contracts import SchemaError
from alpaca_engine.workflow import Workflow
from alpaca_engine.workflows.loader import load_workflow_text
from alpaca_engine.workflows.schema import WorkflowError

DECISION = {"type": "object", "additionalProperties": False,
            "required": ["decision", "confidence", "reasons"],
            "properties": {"decision": {"type": "string", "enum": ["GO", "NO-GO"]},
                           "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                           "reasons": {"type": "array", "items": {"type": "string"}}}}
VALID = '{"decision": "GO", "reasons": ["signed"], "confidence": 0.9}'


def typed(script: Sequence[Any] | FunctionModel, *, retries: int = 1,
          schema: dict[str, Any] | None = None, output_type: Any = None) -> Workflow:
    model = script if isinstance(script, FunctionModel) else ScriptedModel(list(script))
    if schema is None and output_type is None:
        schema = DECISION
    agent = Agent(name="decider", model=model, output_schema=schema,
                  output_type=output_type, output_retries=retries)
    return Workflow(ref="t", agents={"decider": agent})


async def audit_kinds(store: Any, run_id: str) -> list[str]:
    return [a.kind for a in await store.list_audit(run_id)]


async def test_a_valid_answer_is_stored_as_canonical_json_and_read_back_parsed(store) -> None:
    wf = typed([f"```json\n{VALID}\n```"])  # a fenced answer is accepted
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go?")
    assert run.state == "succeeded" and run.output_type == "json"
    assert run.output == '{"confidence":0.9,"decision":"GO","reasons":["signed"]}'
    assert run.value == {"decision": "GO", "confidence": 0.9, "reasons": ["signed"]}
    assert Run.of(run).output == run.value and Run.of(run).output_type == "json"
    assert "output.invalid" not in await audit_kinds(store, run.id)


async def test_an_invalid_answer_gets_a_correction_then_the_valid_one_wins(store) -> None:
    model = ScriptedModel(['{"decision": "MAYBE"}', VALID])
    wf = Workflow(ref="t", agents={"decider": Agent(name="decider", model=model,
                                                    output_schema=DECISION)})
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go?")

    assert run.state == "succeeded" and run.value["decision"] == "GO"
    correction = model.calls[1][-1]
    assert correction.role == "user" and model.calls[1][-2].content == '{"decision": "MAYBE"}'
    assert "does not match the output schema" in (correction.content or "")
    assert "/decision" in (correction.content or "")  # the validator's own message
    audit = await store.list_audit(run.id)
    [invalid] = [a for a in audit if a.kind == "output.invalid"]
    assert invalid.data["step"] == 1 and "required" in invalid.data["message"]
    steps = await store.list_steps(run.id)
    assert [s.kind for s in steps] == ["model", "model"]  # the correction is a model turn


async def test_out_of_retries_the_run_fails_invalid_output_with_the_last_message(store) -> None:
    wf = typed(["not json at all", '{"decision": "GO"}'], retries=1)
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go?")
    assert run.state == "failed" and run.error_code == "invalid_output"
    assert "after 1 correction" in (run.error_message or "")
    assert '"confidence" is a required property' in (run.error_message or "")
    assert run.output is None
    assert (await audit_kinds(store, run.id)).count("output.invalid") == 2
    assert all(s.status == "completed" for s in await store.list_steps(run.id))


async def test_output_retries_zero_fails_on_the_first_violation(store) -> None:
    wf = typed(["[]", VALID], retries=0)
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go?")
    assert run.error_code == "invalid_output" and "after 0 corrections" in (
        run.error_message or "")
    assert "is not of type" in (run.error_message or "")


async def test_a_pydantic_model_is_an_output_type(store) -> None:
    class Verdict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        decision: str
        confidence: float

    wf = typed(['{"decision": "GO"}', '{"decision": "GO", "confidence": 0.5}'],
               output_type=Verdict)
    assert wf.agents["decider"].output_schema is not None
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go?")
    assert run.state == "succeeded"
    assert Verdict.model_validate(run.value) == Verdict(decision="GO", confidence=0.5)


async def test_a_plain_type_is_an_output_type_too(store) -> None:
    wf = typed(['["a", 1]', '["a", "b"]'], output_type=list[str])
    run = await Engine(store, lambda r: wf).run(wf, "decider", "list")
    assert run.value == ["a", "b"]


def test_a_schema_that_does_not_compile_fails_when_the_agent_is_made() -> None:
    with pytest.raises(SchemaError):
        Agent(name="a", model=ScriptedModel(["x"]), output_schema={"type": "no-such-type"})
    with pytest.raises(ValueError):
        Agent(name="a", model=ScriptedModel(["x"]), output_retries=-1)


async def test_a_delegating_parent_gets_the_parsed_value(store) -> None:
    parent = ScriptedModel([{"tool": "delegate_to_decider", "args": {"task": "decide"}},
                            "done"])
    agents = {
        "lead": Agent(name="lead", model=parent, delegates_to=["decider"]),
        "decider": Agent(name="decider", model=ScriptedModel([VALID]),
                         output_schema=DECISION),
    }
    wf = Workflow(ref="t", agents=agents)
    run = await Engine(store, lambda r: wf).run(wf, "lead", "go")
    assert run.state == "succeeded" and run.output_type == "text"
    tool_result = json.loads(parent.calls[1][-1].content or "null")
    assert tool_result["output"] == {"decision": "GO", "confidence": 0.9, "reasons": ["signed"]}
    [delegation] = [s for s in await store.list_steps(run.id) if s.kind == "delegation"]
    assert delegation.output["output"]["decision"] == "GO"


async def test_a_resumed_run_sends_the_same_correction_and_audits_it_once(store) -> None:
    crashed = {"armed": True}

    class Crash(asyncio.CancelledError):
        pass

    def decide(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
        if sum(m.role == "assistant" for m in messages) == 0:
            return '{"decision": "GO"}'
        if crashed["armed"]:
            crashed["armed"] = False
            raise Crash()
        return VALID

    seen: list[list[Message]] = []

    async def recording(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
        seen.append(list(messages))
        await asyncio.sleep(0)  # the heartbeat starts: the crash is not read as a lost lease
        return decide(messages, tools)

    wf = typed(FunctionModel(recording))
    first = Engine(store, lambda r: wf, owner="host:1:a")
    submitted = await first.submit(wf, "decider", "go?")
    with pytest.raises(Crash):
        await first.execute(submitted.id)
    done = await Engine(store, lambda r: wf, owner="host:2:b").resume(submitted.id, force=True)

    assert done.state == "succeeded" and done.value["decision"] == "GO"
    assert seen[1] == seen[2]  # the same conversation, correction included, after the crash
    assert (await audit_kinds(store, done.id)).count("output.invalid") == 1


# -- the workflow file ---------------------------------------------------------------------


WORKFLOW = """
version: 1
agents:
  - name: decider
    output_retries: 2
    output_schema:
      type: object
      required: [decision]
      properties: {decision: {type: string}}
    model: {provider: scripted, script: ['{"decision": "GO"}']}
"""


async def test_yaml_output_schema_and_retries(store, tmp_path: Path) -> None:
    wf = load_workflow_text(WORKFLOW, base_dir=tmp_path)
    agent = wf.agents["decider"]
    assert agent.output_retries == 2 and agent.output_schema is not None
    run = await Engine(store, lambda r: wf).run(wf, "decider", "go")
    assert run.value == {"decision": "GO"}


def test_a_yaml_schema_that_is_not_a_schema_is_a_load_error_with_its_line(
        tmp_path: Path) -> None:
    broken = WORKFLOW.replace("type: object", "type: 12")
    with pytest.raises(WorkflowError) as caught:
        load_workflow_text(broken, base_dir=tmp_path)
    assert str(caught.value).startswith("<string>:6: agents[0].output_schema: invalid JSON")


def test_cli_json_prints_the_value_parsed_and_run_prints_it_pretty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "typed.yaml"
    path.write_text(textwrap.dedent(WORKFLOW))
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--agent", "decider", "--input", "go",
                                 "--json"])
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    assert run["output"] == {"decision": "GO"} and run["output_type"] == "json"
    result = runner.invoke(app, ["run", str(path), "--agent", "decider", "--input", "go"])
    assert result.exit_code == 0 and '"decision": "GO"' in result.output
    result = runner.invoke(app, ["runs", "show", run["id"], "--json"])
    assert json.loads(result.output)["run"]["output"] == {"decision": "GO"}

"""The budget is never overspent, even by a provider that ignores the output cap (DESIGN §5).

The OpenAI tests go through the real ``openai`` SDK, faked only at the HTTP transport: the
request body must carry the cap the reservation assumed, and a response whose usage still
exceeds its reservation must stop the tree with ``budget_exceeded``, its usage recorded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import Message, ModelResponse, ToolSpec, Usage
from alpaca_engine.models.openai import OpenAIModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow
from alpaca_engine.workflows.loader import load_workflow_text

LONG_ANSWER = "word " * 270


class CapIgnoringServer:
    """An OpenAI-compatible endpoint that answers ~270 tokens whatever the request caps."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return httpx.Response(200, json={
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
            "model": "gpt-test", "choices": [{"index": 0, "finish_reason": "length", "message": {
                "role": "assistant", "content": LONG_ANSWER}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 250, "total_tokens": 270}})

    def model(self, **kw: Any) -> OpenAIModel:
        client = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return OpenAIModel("gpt-test", api_key="sk-test-budget-0123456789", http_client=client,
                           **kw)


def one_agent(model: Any, budget: dict[str, Any], max_output_tokens: int = 50) -> Workflow:
    agent = Agent(name="writer", model=model, instructions="Be brief.",
                  max_output_tokens=max_output_tokens)
    return Workflow(ref="test", agents={"writer": agent}, budget=budget)


async def test_a_provider_ignoring_the_cap_stops_the_run_with_budget_exceeded(store) -> None:
    server = CapIgnoringServer()
    wf = one_agent(server.model(), {"max_tokens": 100})
    run = await Engine(store, lambda ref: wf).run(wf, "writer", "Write a poem.")

    assert server.bodies[0]["max_completion_tokens"] == 50  # the cap went with the request
    assert "max_tokens" not in server.bodies[0]
    assert run.state == "failed" and run.error_code == "budget_exceeded"
    assert "tokens used 270 of 100" in (run.error_message or "")
    ledger = await store.get_ledger(run.id)
    assert ledger.used["tokens"] == 270 and ledger.exhausted == "tokens"  # actual usage
    [step] = await store.list_steps(run.id)
    assert step.status == "completed" and step.output["usage"]["output_tokens"] == 250
    audit = await store.list_audit(run.id)
    [overrun] = [a for a in audit if a.kind == "budget.overrun"]
    assert overrun.data["actual"]["tokens"] == 270 and overrun.data["reserved"]["tokens"] < 100
    assert audit[-1].data["to"] == "failed"
    assert audit[-1].data["error_code"] == "budget_exceeded"


async def test_the_cap_field_can_be_max_tokens_and_settings_only_lower_it() -> None:
    from alpaca_engine.models.base import ModelSettings

    user = [Message(role="user", content="hi")]
    server = CapIgnoringServer()
    await server.model(output_cap_param="max_tokens").complete(
        user, [], settings=ModelSettings(max_output_tokens=50))
    await server.model(settings={"max_tokens": 20}).complete(
        user, [], settings=ModelSettings(max_output_tokens=50))
    await server.model(settings={"max_completion_tokens": 500}).complete(
        user, [], settings=ModelSettings(max_output_tokens=50))
    first, lowered, raised = server.bodies
    assert first["max_tokens"] == 50 and "max_completion_tokens" not in first
    assert lowered["max_tokens"] == 20 and "max_completion_tokens" not in lowered
    assert raised["max_completion_tokens"] == 50  # a settings value never widens the cap


def test_the_workflow_file_names_the_cap_field(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LOCAL_KEY", "sk-local-0123456789abc")
    wf = load_workflow_text("""
version: 1
agents:
  - name: local
    model: {provider: openai, model: llama3, base_url: "http://127.0.0.1:9/v1",
            api_key_env: LOCAL_KEY, output_cap_param: max_tokens}
    limits: {max_output_tokens: 64}
""", source="cap.yaml")
    agent = wf.agent("local")
    assert agent.max_output_tokens == 64
    assert agent.model._output_cap_param == "max_tokens"  # type: ignore[attr-defined]


async def test_an_overspending_child_stops_the_whole_tree(store) -> None:
    from tests.unit.test_delegation import delegate

    greedy = ModelResponse(content="done", usage=Usage(input_tokens=10, output_tokens=5000))
    boss = Agent(name="boss", model=ScriptedModel([delegate("helper"), "never reached"]),
                 delegates_to=["helper"], max_output_tokens=50)
    helper = Agent(name="helper", model=ScriptedModel([greedy]), max_output_tokens=50)
    wf = Workflow(ref="test", agents={"boss": boss, "helper": helper},
                  budget={"max_tokens": 1000})
    run = await Engine(store, lambda ref: wf).run(wf, "boss", "go")

    tree = {r.agent: r for r in await store.list_runs(root_id=run.id)}
    assert tree["helper"].state == "failed" and tree["helper"].error_code == "budget_exceeded"
    assert run.state == "failed" and run.error_code == "budget_exceeded"
    ledger = await store.get_ledger(run.id)
    assert ledger.exhausted == "tokens" and ledger.used["tokens"] > 1000


async def test_cost_overspent_by_actual_usage_stops_the_run(store) -> None:
    pricey = ModelResponse(content="done", usage=Usage(input_tokens=10, output_tokens=1000))
    agent = Agent(name="writer", model=ScriptedModel([pricey], name="openai:gpt-4o"),
                  max_output_tokens=10)
    wf = Workflow(ref="test", agents={"writer": agent}, budget={"max_cost": 0.001},
                  tools=ToolRegistry([]))
    run = await Engine(store, lambda ref: wf).run(wf, "writer", "go")
    assert run.state == "failed" and run.error_code == "budget_exceeded"
    assert "cost used" in (run.error_message or "")
    ledger = await store.get_ledger(run.id)
    assert ledger.exhausted == "cost" and ledger.used["cost"] > 0.001


async def test_a_model_written_before_settings_existed_still_runs(store) -> None:
    class TwoParameterModel:
        name = "legacy"

        async def complete(self, messages: Sequence[Message],
                           tools: Sequence[ToolSpec]) -> ModelResponse:
            return ModelResponse(content="still here")

    wf = one_agent(TwoParameterModel(), {})
    run = await Engine(store, lambda ref: wf).run(wf, "writer", "go")
    assert run.state == "succeeded" and run.output == "still here"

"""Each failed attempt of a model call is journaled and audited (DESIGN §6)."""

from __future__ import annotations

import json

import httpx

from alpaca_engine.agents import Agent
from alpaca_engine.clock import FakeClock
from alpaca_engine.engine import Engine
from alpaca_engine.models.openai import OpenAIModel
from alpaca_engine.tools.retry import RetryPolicy
from alpaca_engine.workflow import Workflow

COMPLETION = {
    "id": "c", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
}


async def test_provider_retries_are_journaled(store):
    answers = [httpx.Response(429, json={"error": {"message": "slow down"}}),
               httpx.Response(503, json={"error": {"message": "busy"}}),
               httpx.Response(200, json=COMPLETION)]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    clock = FakeClock()
    model = OpenAIModel("gpt-4o-mini", api_key="sk-test-retry-0000000000",
                        base_url="http://llm.test/v1", clock=clock,
                        retry=RetryPolicy(max_attempts=3, initial_delay=0.5, jitter=0),
                        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    wf = Workflow(ref="t", agents={"a": Agent(name="a", model=model)})
    run = await Engine(store, lambda r: wf, clock=clock).run(wf, "a", "hi")
    assert run.state == "succeeded" and run.output == "hello"
    [step] = await store.list_steps(run.id)
    assert step.attempts == 3
    retries = [a.data for a in await store.list_audit(run.id) if a.kind == "model.retry"]
    assert [(r["attempt"], r["delay"]) for r in retries] == [(1, 0.5), (2, 1.0)]
    assert "429" in json.dumps(retries[0]) and clock.sleeps == [0.5, 1.0]

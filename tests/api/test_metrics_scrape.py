"""`/metrics` after scripted runs, parsed as Prometheus parses it.

Runs by state count every state change once wherever it is made (here: the runner, and a
cancel through the API); budget use reports every resource its help names; a tool name a
model invents is one bounded label; no ``_created`` series.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ApiFactory

TOOLS_PY = '''
from alpaca_engine.tools.decorator import tool


@tool
def lookup(q: str) -> str:
    """Look something up."""
    return f"found {q}"


@tool
def announce(message: str) -> str:
    """Announce something."""
    return "announced"
'''

WORKFLOW_YAML = """
version: 1
defaults:
  prices: {scripted: {input: 1000, output: 3000}}
tools:
  - python: "metrics_tools:lookup"
    cost: 0.25
  - python: "metrics_tools:announce"
    approval: required
agents:
  - name: worker
    model:
      provider: scripted
      script:
        - {tool: lookup, args: {q: "alpacas"}}
        - {tool: definitely_not_a_tool_1f3a, args: {}}
        - "done"
    tools: [lookup]
  - name: announcer
    model:
      provider: scripted
      script:
        - {tool: announce, args: {message: "noon"}}
        - "announced"
    tools: [announce]
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def metrics_workflow(tmp_path: Path) -> Path:
    folder = tmp_path / "mwf"
    folder.mkdir()
    (folder / "metrics_tools.py").write_text(textwrap.dedent(TOOLS_PY))
    (folder / "workflow.yaml").write_text(WORKFLOW_YAML)
    return folder / "workflow.yaml"


def scrape(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def expected_from(audits: list[list[dict[str, Any]]]) -> tuple[dict[str, int], dict[str, float]]:
    """What the audit logs say happened: state entries, and resources spent."""
    states: dict[str, int] = {}
    spent = {"steps": 0.0, "tool_calls": 0.0, "input_tokens": 0.0, "output_tokens": 0.0,
             "cost": 0.0}
    for audit in audits:
        for record in audit:
            kind, data = record["kind"], record["data"]
            if kind in ("run.created", "state.changed"):
                to = "queued" if kind == "run.created" else data["to"]
                states[to] = states.get(to, 0) + 1
            elif kind == "budget.reserved":
                spent["steps"] += data.get("steps", 0)
                spent["tool_calls"] += data.get("tool_calls", 0)
                spent["cost"] += data.get("cost", 0) if data.get("tool_calls") else 0
            elif kind == "model.output":
                spent["input_tokens"] += data["usage"]["input_tokens"]
                spent["output_tokens"] += data["usage"]["output_tokens"]
                spent["cost"] += data["cost"]
    return states, spent


async def test_metrics_count_every_state_change_and_budget_use_with_bounded_labels(
        start_api: ApiFactory, metrics_workflow: Path) -> None:
    async with start_api(workflows=[str(metrics_workflow)]) as api, api.client() as c:
        before = scrape((await c.get("/metrics")).text)
        done = (await c.post("/v1/runs?wait=true", json={"agent": "worker", "input": "go"})).json()
        assert done["state"] == "succeeded"
        gated = (await c.post("/v1/runs?wait=true", json={"agent": "announcer",
                                                           "input": "go"})).json()
        assert gated["state"] == "waiting"
        cancelled = (await c.post(f"/v1/runs/{gated['id']}/cancel")).json()
        assert cancelled["run"]["state"] == "cancelled"
        await asyncio.sleep(0.2)  # nothing else may happen: the embedded worker is idle
        response = await c.get("/metrics")
        after = scrape(response.text)
        audits = [(await c.get(f"/v1/runs/{r['id']}/audit")).json()["items"]
                  for r in (done, gated)]

    states, spent = expected_from(audits)
    assert {"queued", "running", "waiting", "succeeded", "cancelled"} <= set(states)
    for state in ("queued", "running", "waiting", "succeeded", "cancelled", "failed"):
        assert delta(before, after, "alpaca_runs_total", state=state) == states.get(state, 0), \
            state
    assert delta(before, after, "alpaca_runs_total", state="cancelled") == 1  # the API cancel

    # the lookup, and the announce call reserved before it waited; the lookup's price + tokens
    assert spent["tool_calls"] == 2 and spent["cost"] > 0.25
    for resource, amount in spent.items():
        assert delta(before, after, "alpaca_budget_used_total", resource=resource) == \
            pytest.approx(amount), resource

    assert delta(before, after, "alpaca_tool_errors_total", tool="_unknown",
                 code="unknown_tool") == 1
    labels = {dict(key[1]).get("tool") for key in after}
    assert "definitely_not_a_tool_1f3a" not in labels

    assert not [name for name, _ in after if name.endswith("_created")]
    assert "_created" not in response.text

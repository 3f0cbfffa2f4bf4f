"""The toolkit through the real StepRunner: contracts, capabilities, approval and retries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from alpaca_engine.agents import Agent, ApprovalPolicy
from alpaca_engine.clock import FakeClock
from alpaca_engine.engine import Engine
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.telemetry.logging import clear_secrets
from alpaca_engine.toolkit import TOOLS, LocalIndex
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow
from alpaca_engine.workflows.loader import load_workflow_text
from tests.unit.toolkit_fixtures.server import LocalServer, Reply, sequence, serve

ARTICLE = (Path(__file__).parent / "toolkit_fixtures" / "article.html").read_text()
HOOK = "/services/T0/B0/engine-secret-token"


@pytest.fixture
def site() -> Iterator[LocalServer]:
    routes: dict[str, Any] = {
        "/article": sequence(Reply(503, "busy", content_type="text/plain"), Reply(body=ARTICLE)),
        HOOK: lambda _r: Reply(body="ok", content_type="text/plain"),
    }
    with serve(routes) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: LocalServer) -> Iterator[None]:
    index = LocalIndex(tmp_path / "search.db")
    index.add("care", "Alpaca care", "Alpacas need a companion and fresh water.")
    monkeypatch.setenv("ALPACA_SEARCH_INDEX", str(index.path))
    monkeypatch.setenv("ALPACA_IDEMPOTENCY_DB", str(tmp_path / "ledger.db"))
    monkeypatch.setenv("ALPACA_FETCH_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("ALPACA_SLACK_WEBHOOK_URL", site.url(HOOK))
    for name in ("ALPACA_SEARCH_PROVIDER", "ALPACA_SEARCH_URL", "ALPACA_SEARCH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    yield
    clear_secrets()


def _workflow(script: list[Any], capabilities: frozenset[str] | None = None) -> Workflow:
    agent = Agent(name="agent", model=ScriptedModel(script), tools=["*"],
                  capabilities=capabilities, approval=ApprovalPolicy())
    return Workflow(ref="t", agents={"agent": agent}, tools=ToolRegistry(list(TOOLS)))


def _tool_results(wf: Workflow) -> list[Any]:
    model = wf.agents["agent"].model
    assert isinstance(model, ScriptedModel)
    return [json.loads(m.content or "null") for m in model.calls[-1] if m.role == "tool"]


async def test_research_then_gated_notification(store: Any, site: LocalServer) -> None:
    wf = _workflow([
        {"calls": [
            {"tool": "web_search", "args": {"query": "alpaca companion"}},
            {"tool": "fetch_page", "args": {"url": site.url("/article")}},
        ]},
        {"tool": "notify_slack", "args": {"text": "Alpacas need company."}},
        "done",
    ])
    eng = Engine(store, lambda _ref: wf, clock=FakeClock())
    run = await eng.run(wf, "agent", "research alpacas")
    assert run.state == "waiting"  # notify_slack is gated
    assert site.hits(HOOK) == []
    search, page = _tool_results(wf)
    assert search["source"] == "local" and search["hits"][0]["doc_id"] == "care"
    assert "camelids" in page["text"] and len(site.hits("/article")) == 2  # 503 retried

    [approval] = await store.list_approvals(status="pending")
    assert approval.action == "notify_slack"
    await store.decide_approval(approval.id, approve=True, by="sue", comment=None, now=1.0)
    done = await eng.run_tree(run.id)
    assert done.state == "succeeded", (done.error_code, done.error_message)
    [posted] = site.hits(HOOK)
    assert posted.json() == {"text": "Alpacas need company."}
    # steps: 1 model, 2 search, 3 fetch, 4 model, 5 notify
    assert posted.headers["Idempotency-Key"] == f"{run.id}:5"
    delivery = _tool_results(wf)[-1]
    assert delivery["ok"] is True and delivery["deduplicated"] is False
    steps = await store.list_steps(run.id)
    assert HOOK not in json.dumps([s.output for s in steps], default=str)


async def test_capabilities_gate_the_toolkit(store: Any, site: LocalServer) -> None:
    wf = _workflow([
        {"tool": "fetch_page", "args": {"url": site.url("/article")}},
        "refused",
    ], capabilities=frozenset({"search:local"}))
    run = await Engine(store, lambda _ref: wf, clock=FakeClock()).run(wf, "agent", "go")
    assert run.state == "succeeded"
    [result] = _tool_results(wf)
    assert result["error"]["code"] == "permission_denied"
    assert site.hits("/article") == []


async def test_ssrf_refusal_reaches_the_model(
    store: Any, site: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALPACA_FETCH_ALLOW_PRIVATE")
    wf = _workflow([{"tool": "fetch_page", "args": {"url": site.url("/article")}}, "ok"])
    run = await Engine(store, lambda _ref: wf, clock=FakeClock()).run(wf, "agent", "go")
    assert run.state == "succeeded"
    [result] = _tool_results(wf)
    assert result["error"]["code"] == "tool_error"
    assert "non-public address" in result["error"]["message"]
    assert site.hits("/article") == []


def test_workflow_files_reference_the_toolkit() -> None:
    wf = load_workflow_text(
        """
version: 1
tools:
  - python: "alpaca_engine.toolkit:fetch_page"
  - python: "alpaca_engine.toolkit:search_documents"
  - python: "alpaca_engine.toolkit:web_search"
  - python: "alpaca_engine.toolkit:notify_slack"
agents:
  - name: notifier
    model: {provider: scripted, script: ["ok"]}
    tools: [notify_slack, fetch_page]
    capabilities: ["notify:slack", "net:fetch"]
""",
    )
    tools = {name: wf.tools.get(name) for name in
             ("fetch_page", "search_documents", "web_search", "notify_slack")}
    assert all(tools.values())
    assert tools["notify_slack"] is not None and tools["notify_slack"].approval == "required"
    assert tools["fetch_page"] is not None
    assert tools["fetch_page"].capabilities == frozenset({"net:fetch"})

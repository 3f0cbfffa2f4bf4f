"""The graph a builder draws: nodes with stable ids, and delegation, use and gate edges."""

from __future__ import annotations

import textwrap

from alpaca_engine.workflows.graph import workflow_graph
from alpaca_engine.workflows.loader import load_workflow_text, resolve_workflow


def test_the_demo_is_the_builders_picture() -> None:
    graph = workflow_graph(resolve_workflow("builtin:demo"))
    assert graph.workflow == "builtin:demo" and graph.roots == [
        "agent:orchestrator", "agent:assistant"]  # the builder's entry, and the chat agent
    nodes = {n.id: n for n in graph.nodes}
    assert [n for n in nodes if n.startswith("agent:")] == [
        "agent:orchestrator", "agent:search", "agent:research", "agent:decision",
        "agent:notification", "agent:assistant"]
    assert {n for n in nodes if n.startswith("tool:")} == {
        "tool:web_search", "tool:search_documents", "tool:fetch_page", "tool:notify_slack"}
    orchestrator = nodes["agent:orchestrator"]
    assert orchestrator.data["root"] and orchestrator.data["limits"]["max_steps"] == 8
    assert orchestrator.data["model"] == "function"
    slack = nodes["tool:notify_slack"]
    assert (slack.data["approval"], slack.data["capabilities"]) == ("required", ["notify:slack"])
    edges = {(e.kind, e.source, e.target) for e in graph.edges}
    assert {("delegates_to", "agent:orchestrator", f"agent:{a}")
            for a in ("search", "research", "decision", "notification")} <= edges
    assert ("uses", "agent:research", "tool:fetch_page") in edges
    assert ("uses", "agent:assistant", "tool:search_documents") in edges
    assert ("gated", "agent:notification", "tool:notify_slack") in edges
    assert len({e.id for e in graph.edges}) == len(graph.edges)  # ids are unique


def test_gates_permissions_and_globs_are_drawn() -> None:
    workflow = load_workflow_text(textwrap.dedent("""
        version: 1
        tools:
          - name: search_web
            http: {url: "https://search.example.com/q"}
            capabilities: [net:search]
          - name: search_docs
            http: {url: "https://docs.example.com/q"}
        agents:
          - name: boss
            model: {provider: scripted, script: [done]}
            delegates_to: [helper]
            approval: {delegations: [helper]}
          - name: helper
            model: {provider: scripted, script: [done]}
            tools: ["search_*"]
            capabilities: []
            approval: {cost_above: 0, tools: [search_docs]}
    """), ref="wf")
    graph = workflow_graph(workflow)
    by_kind = {(e.kind, e.source, e.target): e for e in graph.edges}
    assert by_kind[("gated", "agent:boss", "agent:helper")].data["reason"] == (
        "policy: delegating to 'helper' needs approval")
    web = by_kind[("uses", "agent:helper", "tool:search_web")]
    assert (web.data["pattern"], web.data["permitted"]) == ("search_*", False)
    assert "needs capabilities not granted: net:search" in web.data["rule"]
    assert by_kind[("uses", "agent:helper", "tool:search_docs")].data["permitted"]
    assert ("gated", "agent:helper", "tool:search_docs") in by_kind
    http = next(n for n in graph.nodes if n.id == "tool:search_docs").data["http"]
    assert http == {"method": "GET", "url": "https://docs.example.com/q"}

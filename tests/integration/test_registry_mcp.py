"""A pushed workflow with an MCP server over streamable HTTP: validated, drawn, run."""

from __future__ import annotations

import json
import textwrap

import pytest

from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.workflows.graph import workflow_graph
from alpaca_engine.workflows.loader import resolve_workflow
from alpaca_engine.workflows.registry import WorkflowRegistry, WorkflowRejected
from tests.integration.test_mcp import http_server, servers, store  # noqa: F401 (fixtures)


def document(url: str) -> str:
    return textwrap.dedent(f"""
        version: 1
        name: remote-math
        tools:
          - mcp:
              server: remote
              url: {json.dumps(url)}
              headers: {{Authorization: "Bearer ${{ALPACA_TEST_MCP_TOKEN}}"}}
            include: [add]
        agents:
          - name: mathematician
            model:
              provider: scripted
              script:
                - {{tool: remote_add, args: {{a: 20, b: 22}}}}
                - "42"
            tools: ["remote_*"]
    """).lstrip("\n")


async def test_a_pushed_mcp_over_http_workflow_runs_and_is_drawn(
        http_server, store: SQLiteStore, servers, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    url, seen = http_server
    monkeypatch.setenv("ALPACA_TEST_MCP_TOKEN", "mcp-secret-0f3c9a")
    registry = WorkflowRegistry(store)
    with pytest.raises(WorkflowRejected) as info:  # private target, secret not lent
        await registry.push("acme", document(url))
    assert [(e.field, e.line) for e in info.value.diagnosis.errors] == [
        ("tools[0].mcp.url", 6), ("tools[0].mcp.headers.Authorization", 7)]
    monkeypatch.setenv("ALPACA_REGISTRY_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("ALPACA_REGISTRY_SECRETS", "ALPACA_TEST_MCP_TOKEN")
    record, created, _ = await registry.push("acme", document(url))
    assert created and record.version == 1

    engine = Engine(store, resolve_workflow)
    workflow = await engine.registry.resolve("acme", "remote-math")
    servers.append(workflow)
    done = await engine.run(workflow, "mathematician", "add", tenant="acme")
    assert (done.state, done.output, done.workflow) == (
        RunState.SUCCEEDED, "42", "registry:remote-math@1")
    assert set(seen) == {"Bearer mcp-secret-0f3c9a"}

    graph = workflow_graph(workflow)
    mcp = next(n for n in graph.nodes if n.kind == "mcp")
    assert (mcp.id, mcp.data) == ("mcp:remote", {"transport": "http", "url": url})
    edges = {(e.kind, e.source, e.target) for e in graph.edges}
    assert edges == {("provides", "mcp:remote", "tool:remote_add"),
                     ("uses", "agent:mathematician", "tool:remote_add")}
    assert "mcp-secret" not in graph.model_dump_json()

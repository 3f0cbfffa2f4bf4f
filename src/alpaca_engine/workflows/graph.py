"""A workflow as a graph a builder can draw (DESIGN §11): nodes and edges, no positions.

Nodes: agents (model and limits), tools (capabilities, approval rule), MCP servers. Edges:
``delegates_to`` (agent -> agent), ``uses`` (agent -> each tool its allowlist matches, with
whether its capabilities permit the call), ``gated`` (agent -> tool or agent, when a call
waits for a supervisor, with the reason) and ``provides`` (MCP server -> its tools). Ids are
stable and readable (``agent:orchestrator``, ``tool:notify_slack``, ``mcp:docs``), so a
builder can keep its own layout keyed by them across versions. Pure: built from a loaded
``Workflow``, no I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ..agents import Agent
from ..tools.base import Tool
from ..tools.governance import check_tool, matching_pattern
from ..workflow import Workflow

__all__ = ["Edge", "Graph", "Node", "workflow_graph"]

NodeKind = Literal["agent", "tool", "mcp"]
EdgeKind = Literal["delegates_to", "uses", "gated", "provides"]


class Node(BaseModel):
    id: str = Field(examples=["agent:orchestrator"])
    kind: NodeKind
    label: str
    data: dict[str, Any] = Field(default_factory=dict)


class Edge(BaseModel):
    id: str = Field(examples=["uses:agent:notification->tool:notify_slack"])
    kind: EdgeKind
    source: str
    target: str
    data: dict[str, Any] = Field(default_factory=dict)


class Graph(BaseModel):
    workflow: str = Field(description="The ref the graph was drawn from.")
    roots: list[str] = Field(description="Agents no other agent delegates to (where to start "
                                         "a left-to-right layout).")
    nodes: list[Node]
    edges: list[Edge]


def agent_id(name: str) -> str:
    return f"agent:{name}"


def tool_id(name: str) -> str:
    return f"tool:{name}"


def mcp_id(name: str) -> str:
    return f"mcp:{name}"


def _edge(kind: EdgeKind, source: str, target: str, **data: Any) -> Edge:
    return Edge(id=f"{kind}:{source}->{target}", kind=kind, source=source, target=target,
                data=data)


def workflow_graph(workflow: Workflow) -> Graph:
    agents = list(workflow.agents.values())
    delegated = {target for a in agents for target in a.delegates_to}
    roots = [agent_id(a.name) for a in agents if a.name not in delegated]
    nodes = [_agent_node(a, a.name not in delegated) for a in agents]
    tools = list(workflow.tools)
    nodes += [_tool_node(t) for t in tools]
    servers: dict[str, dict[str, Any]] = {}
    edges: list[Edge] = []
    for tool in tools:
        mcp = tool.describe().get("mcp")
        if isinstance(mcp, dict):
            server = getattr(tool, "server", None)
            described = server.describe() if server is not None else {"name": mcp["server"]}
            servers.setdefault(str(mcp["server"]), _server_data(described))
            edges.append(_edge("provides", mcp_id(str(mcp["server"])), tool_id(tool.name)))
    nodes += [Node(id=mcp_id(name), kind="mcp", label=name, data=data)
              for name, data in sorted(servers.items())]
    for agent in agents:
        edges += _agent_edges(agent, tools)
    return Graph(workflow=workflow.ref, roots=roots, nodes=nodes, edges=edges)


def _agent_edges(agent: Agent, tools: list[Tool]) -> list[Edge]:
    source = agent_id(agent.name)
    edges: list[Edge] = []
    for target in agent.delegates_to:
        edges.append(_edge("delegates_to", source, agent_id(target)))
        reason = agent.approval.reason_for_delegation(target)
        if reason is not None:
            edges.append(_edge("gated", source, agent_id(target), reason=reason))
    for tool in tools:
        pattern = matching_pattern(tool.name, agent.tools)
        if pattern is None:
            continue
        decision = check_tool(tool, agent.tools, agent.capabilities)
        edges.append(_edge("uses", source, tool_id(tool.name), pattern=pattern,
                           permitted=decision.allowed, rule=decision.rule))
        reason = agent.approval.reason_for_tool(tool.name, tool.capabilities, tool.cost,
                                                tool.approval == "required")
        if reason is not None:
            edges.append(_edge("gated", source, tool_id(tool.name), reason=reason))
    return edges


def _agent_node(agent: Agent, root: bool) -> Node:
    described = agent.describe()
    return Node(id=agent_id(agent.name), kind="agent", label=agent.name, data={
        "root": root,
        "description": agent.description,
        "model": agent.model.name,
        "capabilities": described["capabilities"],
        "tools": list(agent.tools),
        "limits": {"max_steps": agent.max_steps, "max_output_tokens": agent.max_output_tokens,
                   "budget": dict(agent.budget)},
        "approval": described["approval"],
    })


def _tool_node(tool: Tool) -> Node:
    described = tool.describe()
    data: dict[str, Any] = {
        "source": tool.source,
        "description": tool.description,
        "capabilities": sorted(tool.capabilities),
        "approval": tool.approval,
        "timeout": tool.timeout,
        "retry": {"max_attempts": tool.retry.max_attempts},
        "breaker": tool.breaker is not None,
        "cost": tool.cost,
    }
    if isinstance(described.get("http"), dict):
        http = described["http"]
        data["http"] = {"method": http["method"], "url": http["url"]}
    if isinstance(described.get("mcp"), dict):
        data["mcp"] = {"server": mcp_id(str(described["mcp"]["server"])),
                       "tool": described["mcp"]["tool"]}
    return Node(id=tool_id(tool.name), kind="tool", label=tool.name, data=data)


def _server_data(described: dict[str, Any]) -> dict[str, Any]:
    """What to show of an MCP server: transport and where, never header or env values."""
    out: dict[str, Any] = {"transport": described.get("transport", "http")}
    if "url" in described:
        out["url"] = described["url"]
    if "command" in described:
        out["command"] = described["command"][:1]  # the program, not its arguments
    return out

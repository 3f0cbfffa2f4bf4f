"""Sub-agents exposed to their parent as tools, and the checks that keep trees bounded.

Pure functions: the runner asks them whether a delegation may happen and what the child
run looks like; nothing here performs I/O.
"""

from __future__ import annotations

from typing import Any

from .agents import Agent, effective_capabilities
from .errors import ErrorCode
from .models.base import ToolSpec
from .store.records import RunRecord

PREFIX = "delegate_to_"

TASK_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"task": {"type": "string", "minLength": 1,
                            "description": "What the sub-agent should do, self-contained."}},
    "required": ["task"],
    "additionalProperties": False,
}


def tool_name(agent: str) -> str:
    return f"{PREFIX}{agent}"


def target_of(name: str) -> str | None:
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def specs(agent: Agent, agents: dict[str, Agent]) -> list[ToolSpec]:
    """The delegation tools a model may see: only agents it is allowed to delegate to."""
    out = []
    for target in agent.delegates_to:
        child = agents.get(target)
        if child is None:
            continue
        desc = child.description or f"Delegate a task to the {target} agent."
        out.append(ToolSpec(name=tool_name(target), description=desc, parameters=TASK_SCHEMA))
    return out


def refusal(run: RunRecord, agent: Agent, target: str, max_depth: int,
            known: bool) -> tuple[ErrorCode, str] | None:
    """Why this delegation may not happen, or None when it may."""
    if not known:
        return ErrorCode.UNKNOWN_TOOL, f"no agent named {target!r} to delegate to"
    if target not in agent.delegates_to:
        return (ErrorCode.PERMISSION_DENIED,
                f"agent {agent.name!r} may not delegate to {target!r}")
    if target in run.ancestry:
        chain = " -> ".join([*run.ancestry, target])
        return ErrorCode.CYCLE_DETECTED, f"delegation cycle: {chain}"
    if run.depth + 1 > max_depth:
        return (ErrorCode.DEPTH_EXCEEDED,
                f"delegating to {target!r} would reach depth {run.depth + 1} > "
                f"max_depth {max_depth}")
    return None


def child_id(parent_id: str, step: int) -> str:
    """Deterministic, so a crash between creating the child and journaling cannot fork it."""
    return f"{parent_id}.{step}"


def child_run(parent: RunRecord, parent_caps: frozenset[str] | None, child: Agent,
              task: str, step: int, now: float, ledgers: list[str],
              traceparent: str | None) -> RunRecord:
    caps = effective_capabilities(parent_caps, child.capabilities)
    deadline = parent.budget.get("deadline")
    return RunRecord(
        id=child_id(parent.id, step), tenant=parent.tenant, agent=child.name,
        workflow=parent.workflow, input=task, parent_id=parent.id, root_id=parent.root_id,
        depth=parent.depth + 1, ancestry=[*parent.ancestry, child.name],
        budget={"deadline": deadline} if deadline is not None else {},
        created_at=now, updated_at=now, ledgers=ledgers,
        capabilities=sorted(caps) if caps is not None else None, traceparent=traceparent,
    )


def children_of(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """The runs of a tree grouped by parent id, each group oldest first."""
    children: dict[str, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: r.created_at):
        if r.parent_id:
            children.setdefault(r.parent_id, []).append(r)
    return children

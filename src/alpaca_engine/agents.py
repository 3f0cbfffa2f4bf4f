"""Agents: a model, instructions, what it may call, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from .models.base import Model
from .tools.contracts import Contract
from .typed_output import contract_for


@dataclass(frozen=True)
class ApprovalPolicy:
    """Which of an agent's actions wait for a supervisor (DESIGN §5)."""

    tools: tuple[str, ...] = ()
    """Tool names or globs that always need approval (besides tools marked ``required``)."""
    capabilities: tuple[str, ...] = ()
    """Any tool holding one of these capabilities needs approval."""
    delegations: tuple[str, ...] = ()
    """Delegating to these agents needs approval."""
    cost_above: float | None = None
    """A tool call whose declared cost is above this (USD) needs approval."""
    on_reject: Literal["return", "fail"] = "return"
    expires_after: float | None = 24 * 3600.0
    on_expiry: Literal["deny", "approve"] = "deny"

    def reason_for_tool(self, name: str, capabilities: frozenset[str], cost: float,
                        tool_requires: bool) -> str | None:
        if tool_requires:
            return f"tool {name!r} requires approval"
        for pattern in self.tools:
            if fnmatchcase(name, pattern):
                return f"policy: tools matching {pattern!r} need approval"
        gated = sorted(capabilities & set(self.capabilities))
        if gated:
            return f"policy: capability {gated[0]!r} needs approval"
        if self.cost_above is not None and cost > self.cost_above:
            return f"policy: cost {cost:g} above {self.cost_above:g}"
        return None

    def reason_for_delegation(self, target: str) -> str | None:
        if target in self.delegations:
            return f"policy: delegating to {target!r} needs approval"
        return None


@dataclass(frozen=True)
class HistoryPolicy:
    """How much of a thread's earlier turns each turn sends the model (DESIGN §10).

    Whole turns are kept, newest first, while both bounds hold; everything older is left out
    (and audited as ``history.truncated``). ``None`` bounds nothing."""

    max_turns: int | None = None
    """Most earlier turns sent (0: none)."""
    max_tokens: int | None = None
    """Most estimated tokens (4 characters a token) of the earlier turns sent."""


@dataclass
class Agent:
    name: str
    model: Model
    instructions: str = ""
    tools: list[str] = field(default_factory=list)
    """Allowlist: tool names or glob patterns (``search_*``)."""
    capabilities: frozenset[str] | None = None
    """Granted capabilities; ``None`` means no capability limit beyond the allowlist."""
    delegates_to: list[str] = field(default_factory=list)
    max_steps: int = 25
    """Most model turns this agent may take in one run."""
    description: str = ""
    approval: ApprovalPolicy = field(default_factory=ApprovalPolicy)
    budget: dict[str, float] = field(default_factory=dict)
    """Sub-limits (``max_tool_calls`` …) for this agent's subtree when it is delegated to."""
    max_output_tokens: int = 1024
    """Reserved from the token budget for each model call (the provider's cap)."""
    history: HistoryPolicy = field(default_factory=HistoryPolicy)
    """What a turn of a thread sends of the earlier turns."""
    output_schema: dict[str, Any] | None = None
    """A JSON Schema the final answer must match (a typed agent): its output is JSON."""
    output_type: Any = None
    """The same as a Python type (a pydantic model, ``list[str]``, a TypedDict …): its JSON
    Schema becomes ``output_schema``."""
    output_retries: int = 1
    """Corrections the model gets for an answer that does not match, before the run fails
    with ``invalid_output``."""
    output_contract: Contract | None = field(default=None, init=False, repr=False,
                                             compare=False)

    def __post_init__(self) -> None:
        if self.output_retries < 0:
            raise ValueError("output_retries must be >= 0")
        self.output_contract = contract_for(self.output_schema, self.output_type)
        if self.output_contract is not None:
            self.output_schema = self.output_contract.schema

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model.name,
            "tools": list(self.tools),
            "capabilities": sorted(self.capabilities) if self.capabilities is not None else None,
            "delegates_to": list(self.delegates_to),
            "max_steps": self.max_steps,
            "budget": dict(self.budget),
            "output_schema": self.output_schema,
            "approval": {
                "tools": list(self.approval.tools),
                "capabilities": list(self.approval.capabilities),
                "delegations": list(self.approval.delegations),
                "cost_above": self.approval.cost_above,
                "on_reject": self.approval.on_reject,
                "on_expiry": self.approval.on_expiry,
            },
        }


def effective_capabilities(
    parent: frozenset[str] | None, own: frozenset[str] | None
) -> frozenset[str] | None:
    """Attenuation: a child holds its own capabilities ∩ its parent's (``None`` = no limit)."""
    if parent is None:
        return own
    if own is None:
        return parent
    return own & parent

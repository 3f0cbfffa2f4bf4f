"""A Workflow: the agents and tools a run can use, plus tree-wide defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .agents import Agent
from .tools.registry import ToolRegistry


@dataclass
class Workflow:
    ref: str
    """How a worker in another process finds this workflow again (file path or builtin:NAME)."""
    agents: dict[str, Agent]
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    max_depth: int = 3
    budget: dict[str, Any] = field(default_factory=dict)
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)
    """USD per million (input, output) tokens by model id; overrides budget.DEFAULT_PRICES."""

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise KeyError(f"unknown agent {name!r} (known: {known})") from None

"""A Workflow: the agents and tools a run can use, plus tree-wide defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .agents import Agent
from .tools.registry import ToolRegistry


@dataclass
class Workflow:
    ref: str
    """How a worker in another process finds this workflow again (file path, builtin:NAME or
    registry:NAME@VERSION)."""
    agents: dict[str, Agent]
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    max_depth: int = 3
    budget: dict[str, Any] = field(default_factory=dict)
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)
    """USD per million (input, output) tokens by model id; overrides budget.DEFAULT_PRICES."""
    python_paths: dict[str, str] = field(default_factory=dict)
    """Import path -> tool name of its Python tools (the server's tool catalog draws on it)."""
    model_functions: frozenset[str] = frozenset()
    """Import paths of its function models."""

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise KeyError(f"unknown agent {name!r} (known: {known})") from None

"""Agents: a model, instructions, what it may call, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from .models.base import Model


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

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model.name,
            "tools": list(self.tools),
            "capabilities": sorted(self.capabilities) if self.capabilities is not None else None,
            "delegates_to": list(self.delegates_to),
            "max_steps": self.max_steps,
        }

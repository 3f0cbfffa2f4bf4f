"""Who may call what: allowlists (names and globs) and capabilities. Deny unless allowed.

Pure functions returning a Decision that names the rule, so every allow and deny can be
audited with its reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .base import Tool


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str


def matching_pattern(name: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if fnmatchcase(name, pattern):
            return pattern
    return None


@dataclass(frozen=True)
class TenantPolicy:
    """An operator's limits for one tenant. It can only narrow what agents are allowed:
    tools matching ``deny_tools`` are refused, and capabilities outside ``capabilities``
    (when set) are never granted, whatever the workflow file says."""

    deny_tools: tuple[str, ...] = ()
    capabilities: frozenset[str] | None = None

    def narrow(self, granted: frozenset[str] | None) -> frozenset[str] | None:
        if self.capabilities is None:
            return granted
        return self.capabilities if granted is None else granted & self.capabilities


OPEN_POLICY = TenantPolicy()


def check_tool(
    tool: Tool, allowlist: Iterable[str], granted: frozenset[str] | None,
    tenant: TenantPolicy = OPEN_POLICY,
) -> Decision:
    """``granted=None`` means the agent declares no capability limit."""
    denied = matching_pattern(tool.name, tenant.deny_tools)
    if denied is not None:
        return Decision(False, f"tenant policy denies tools matching {denied!r}")
    granted = tenant.narrow(granted)
    pattern = matching_pattern(tool.name, allowlist)
    if pattern is None:
        return Decision(False, f"tool {tool.name!r} is not in the agent's allowlist")
    if granted is not None:
        missing = sorted(tool.capabilities - granted)
        if missing:
            return Decision(
                False, f"tool {tool.name!r} needs capabilities not granted: {', '.join(missing)}"
            )
    return Decision(True, f"allowlist pattern {pattern!r}, capabilities granted")

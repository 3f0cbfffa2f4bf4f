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
    tenant: TenantPolicy = OPEN_POLICY, declared: frozenset[str] | None = None,
) -> Decision:
    """``granted=None`` means no capability limit; ``declared`` is what the agent's own
    definition grants (``None``: no limit), so a denial can say who narrowed it."""
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
                + _narrowed_by(missing, declared, tenant)
            )
    return Decision(True, f"allowlist pattern {pattern!r}, capabilities granted")


def _narrowed_by(missing: list[str], declared: frozenset[str] | None,
                 tenant: TenantPolicy) -> str:
    """Who took away capabilities the agent declares: the tenant policy or the parent run.

    A delegated run holds its own capabilities ∩ its parent's (attenuation), so a capability
    the agent declares but does not hold, and the tenant allows, is one its parent lacks.
    """
    own = [c for c in missing if declared is None or c in declared]
    by_tenant = [c for c in own if tenant.capabilities is not None and c not in tenant.capabilities]
    by_parent = [c for c in own if c not in by_tenant]
    notes = []
    if by_parent:
        notes.append(f"the agent declares {', '.join(by_parent)}, but its parent run does not"
                     " hold it, and a delegated run keeps only what its parent has")
    if by_tenant:
        notes.append(f"the tenant policy does not allow {', '.join(by_tenant)}")
    return f" ({'; '.join(notes)})" if notes else ""

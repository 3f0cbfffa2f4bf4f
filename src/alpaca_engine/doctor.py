"""The zero-orphans invariant of DESIGN §3, checked against a store.

Every non-terminal run must be queued, running under an unexpired lease, or waiting on a
pending approval or a non-terminal child.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .engine import owner_is_dead_here
from .lifecycle import RunState
from .store.base import Store
from .store.records import ApprovalStatus, RunRecord


@dataclass
class Orphan:
    run_id: str
    state: str
    reason: str


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)
    orphans: list[Orphan] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "orphans": [vars(o) for o in self.orphans],
                "orphan_count": len(self.orphans)}

    def lines(self) -> list[str]:
        out = ["runs by state: " + (", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
                                    or "none")]
        out.append(f"orphaned runs: {len(self.orphans)}")
        out += [f"  {o.run_id} ({o.state}): {o.reason}" for o in self.orphans]
        return out


def orphan_reason(run: RunRecord, children: list[RunRecord], now: float,
                  pending_approvals: int = 0) -> str | None:
    if run.state == RunState.RUNNING:
        if run.lease_expires_at is None or run.lease_expires_at < now:
            return "running with an expired lease"
        if owner_is_dead_here(run.lease_owner):
            return f"running, but its worker {run.lease_owner} is gone"
    if run.state == RunState.WAITING:
        waiting_on_child = any(not c.state.terminal for c in children)
        waiting_on_approval = pending_approvals > 0
        if not (waiting_on_child or waiting_on_approval):
            return "waiting on nothing (no pending approval, no unfinished child)"
    return None


async def check(store: Store, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    report = Report()
    for state in RunState:
        if state.terminal:
            continue
        runs = await store.list_runs(state=state, limit=1_000_000)
        report.counts[str(state)] = len(runs)
        for run in runs:
            children = await store.list_runs(parent_id=run.id, limit=10_000)
            pending = 0
            if run.state == RunState.WAITING:
                pending = len(await store.list_approvals(
                    run_id=run.id, status=ApprovalStatus.PENDING, limit=1))
            reason = orphan_reason(run, children, now, pending)
            if reason:
                report.orphans.append(Orphan(run.id, str(state), reason))
    return report

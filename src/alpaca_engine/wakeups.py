"""Waking waiting runs: a decision arrived or every child finished (DESIGN §3).

Shared by the engine (a finished child wakes its parent), the reaper and the runner (a
child that finished before its parent paused), so the fencing rule lives in one place.
"""

from __future__ import annotations

import contextlib

from .errors import LeaseLost
from .lifecycle import IllegalTransition, RunState
from .store.base import Store
from .store.records import ApprovalStatus, AuditEvent, RunRecord


async def wake_if_ready(store: Store, run: RunRecord, now: float) -> bool:
    """Requeue a waiting run whose children all finished and that awaits no approval."""
    if run.state != RunState.WAITING:
        return False
    if await store.list_approvals(run_id=run.id, status=ApprovalStatus.PENDING, limit=1):
        return False
    children = await store.list_runs(parent_id=run.id, limit=10_000)
    if not children or not all(c.state.terminal for c in children):
        return False
    return await wake(store, run, now, "all child runs finished")


async def wake(store: Store, run: RunRecord, now: float, reason: str) -> bool:
    """Requeue a waiting run at most once: the write is fenced by the epoch read together
    with the waiting state, so a waker acting on a stale read (the run was woken, claimed
    and is running again) is refused instead of preempting its worker."""
    try:
        await store.transition(run.id, RunState.QUEUED, now, epoch=run.epoch,
                               audit=[AuditEvent(kind="run.woken", data={"reason": reason})])
    except (LeaseLost, IllegalTransition):
        return False
    return True


async def wake_finished_waiters(store: Store, now: float) -> list[str]:
    """Reaper: waiting runs whose children have all finished go back to the queue."""
    woken = []
    for run in await store.list_runs(state=RunState.WAITING, limit=10_000):
        with contextlib.suppress(Exception):
            if await wake_if_ready(store, run, now):
                woken.append(run.id)
    return woken

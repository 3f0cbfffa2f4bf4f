"""The Engine: submit runs, lease them, drive them with a StepRunner, resume after crashes.

A run is owned through a lease (owner, expiry, epoch) renewed by a heartbeat; if the
heartbeat finds the lease gone, the runner is cancelled before it can write anything stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

from .clock import Clock, SystemClock
from .errors import LeaseLost
from .events import EventSink, discard
from .lifecycle import RunState
from .runner import Breakers, StepRunner
from .store.base import Store
from .store.records import AuditEvent, RunRecord
from .workflow import Workflow

log = logging.getLogger("alpaca.engine")

WorkflowResolver = Callable[[str], Workflow]


def make_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead_here(owner: str | None) -> bool:
    """True when ``owner`` was a process on this host that no longer exists."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


class RunBusy(Exception):
    """The run is leased by a live worker."""


class Engine:
    def __init__(
        self,
        store: Store,
        resolve: WorkflowResolver,
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        lease_seconds: float = 30.0,
        emit: EventSink = discard,
    ) -> None:
        self.store = store
        self.resolve = resolve
        self.clock = clock or SystemClock()
        self.owner = owner or make_owner()
        self.lease_seconds = lease_seconds
        self.emit = emit
        self.breakers = Breakers(self.clock)

    async def submit(
        self,
        workflow: Workflow,
        agent: str,
        input: str,
        *,
        tenant: str = "local",
        idempotency_key: str | None = None,
        budget: dict[str, Any] | None = None,
    ) -> RunRecord:
        workflow.agent(agent)  # unknown agents are refused before anything is stored
        now = self.clock.now()
        run_id = f"run_{uuid.uuid4().hex[:16]}"
        run = RunRecord(
            id=run_id, tenant=tenant, agent=agent, workflow=workflow.ref, input=input,
            root_id=run_id, ancestry=[agent], idempotency_key=idempotency_key,
            budget={**workflow.budget, **(budget or {})}, created_at=now, updated_at=now,
        )
        record, _created = await self.store.create_run(run, [AuditEvent(
            kind="run.created", actor=f"tenant:{tenant}",
            data={"agent": agent, "workflow": workflow.ref, "input": input,
                  "budget": run.budget})])
        return record

    async def run(self, workflow: Workflow, agent: str, input: str, **kw: Any) -> RunRecord:
        """Submit and execute in this process (the embedded default)."""
        record = await self.submit(workflow, agent, input, **kw)
        result = await self.execute(record.id)
        return result or await self.store.get_run(record.id)

    async def resume(self, run_id: str, *, force: bool = False) -> RunRecord:
        """Continue a run from its journal, taking over a dead local worker's lease."""
        run = await self.store.get_run(run_id)
        if run.state.terminal:
            return run
        if run.state == RunState.WAITING:
            return run
        steal = force or owner_is_dead_here(run.lease_owner)
        claimed = await self.store.claim_run(run_id, self.owner, self.lease_seconds,
                                             self.clock.now(), steal=steal)
        if claimed is None:
            raise RunBusy(
                f"run {run_id} is leased by {run.lease_owner} until "
                f"{run.lease_expires_at}; use --force if that worker is gone")
        return await self._drive(claimed)

    async def execute(self, run_id: str) -> RunRecord | None:
        claimed = await self.store.claim_run(run_id, self.owner, self.lease_seconds,
                                             self.clock.now())
        if claimed is None:
            return None
        return await self._drive(claimed)

    async def _drive(self, run: RunRecord) -> RunRecord:
        """Run the StepRunner under a heartbeat that renews the lease."""
        workflow = self.resolve(run.workflow)
        runner = StepRunner(run, workflow, self.store, clock=self.clock,
                            breakers=self.breakers, emit=self.emit)
        task = asyncio.ensure_future(runner.run())
        beat = asyncio.ensure_future(self._heartbeat(run, task))
        try:
            return await task
        except LeaseLost:
            log.warning("run %s: lease lost, another worker owns it now", run.id)
            return await self.store.get_run(run.id)
        except asyncio.CancelledError:
            if task.cancelled() and beat.done() and not beat.cancelled():
                return await self.store.get_run(run.id)
            raise
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat

    async def _heartbeat(self, run: RunRecord, task: asyncio.Future[RunRecord]) -> None:
        interval = max(self.lease_seconds / 3, 0.05)
        while not task.done():
            await asyncio.sleep(interval)
            try:
                await self.store.renew_lease(run.id, self.owner, run.epoch,
                                             self.lease_seconds, self.clock.now())
            except LeaseLost:
                task.cancel()
                return

    async def release(self, run_id: str, epoch: int) -> None:
        """Hand a running run back to the queue (graceful shutdown)."""
        with contextlib.suppress(LeaseLost):
            await self.store.transition(
                run_id, RunState.QUEUED, self.clock.now(), epoch=epoch,
                audit=[AuditEvent(kind="lease.released", actor=f"worker:{self.owner}")])

    async def reap(self) -> list[str]:
        """Requeue runs whose lease expired or whose local owner process died."""
        requeued = await self.store.requeue_expired(self.clock.now())
        for run in await self.store.list_runs(state=RunState.RUNNING, limit=10_000):
            if owner_is_dead_here(run.lease_owner):
                claimed = await self.store.claim_run(run.id, self.owner, self.lease_seconds,
                                                     self.clock.now(), steal=True)
                if claimed is not None:
                    await self.release(run.id, claimed.epoch)
                    requeued.append(run.id)
        requeued += await wake_finished_waiters(self.store, self.clock.now())
        return requeued


async def wake_finished_waiters(store: Store, now: float) -> list[str]:
    """Waiting runs whose children have all finished go back to the queue."""
    woken = []
    for run in await store.list_runs(state=RunState.WAITING, limit=10_000):
        if run.budget.get("_pending_approval"):
            continue
        children = await store.list_runs(parent_id=run.id, limit=10_000)
        if children and all(c.state.terminal for c in children):
            await store.transition(run.id, RunState.QUEUED, now, audit=[AuditEvent(
                kind="run.woken", data={"reason": "all child runs finished"})])
            woken.append(run.id)
    return woken

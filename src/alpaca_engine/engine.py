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
from collections.abc import Callable, Mapping
from typing import Any

from . import threads
from .budget import limits_from_budget
from .chat_stream import ChatStream
from .clock import Clock, SystemClock
from .coord.base import BreakerBoard, Dispatcher, EventBus
from .coord.local import LocalBreakerBoard
from .coord.outbox import Outbox
from .delegation import children_of
from .errors import ErrorCode, LeaseLost, NotFound, unstorable_text
from .events import EventSink, discard
from .faults import Unavailable
from .lifecycle import RunState
from .runner import StepRunner
from .store.base import Store
from .store.ownership import DEFAULT_MAX_RUN_ATTEMPTS
from .store.records import AuditEvent, LedgerRecord, RunRecord, ThreadRecord
from .telemetry import tracing
from .tools.governance import OPEN_POLICY, TenantPolicy
from .wakeups import wake_finished_waiters, wake_if_ready
from .workflow import Workflow
from .workflows.registry import WorkflowRegistry, is_registry_ref
from .workflows.schema import WorkflowError

log = logging.getLogger("alpaca.engine")

WorkflowResolver = Callable[[str], Workflow]
_UNREACHABLE = (".mcp.url", ".mcp.command")
"""Fields of a load error that say a server could not be reached (worth retrying later)."""


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


def busy_message(run: RunRecord, now: float) -> str:
    """One line for a resume that lost: who owns the run and what to do."""
    if run.state == RunState.RUNNING:
        left = max(0.0, (run.lease_expires_at or now) - now)
        return (f"run {run.id} is owned by {run.lease_owner} (lease expires in {left:.0f}s "
                "unless renewed); wait for it, or use --force if that worker is gone")
    return f"run {run.id} is {run.state} and was not claimed; try again"


class RunBusy(Exception):
    """The run is leased by a live worker (its message is one line naming the owner)."""


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
        breakers: BreakerBoard | None = None,
        events: EventBus | None = None,
        dispatcher: Dispatcher | None = None,
        tenant_policies: Mapping[str, TenantPolicy] | None = None,
        registry: WorkflowRegistry | None = None,
        max_run_attempts: int = DEFAULT_MAX_RUN_ATTEMPTS,
    ) -> None:
        self.store = store
        self.resolve = resolve
        self.registry = registry or WorkflowRegistry(store)
        """Registered workflows (``registry:NAME@V`` refs), read from this engine's store."""
        self.clock = clock or SystemClock()
        self.owner = owner or make_owner()
        self.lease_seconds = lease_seconds
        self.max_run_attempts = max_run_attempts
        """Crashed attempts after which a run is quarantined (``crash_loop``)."""
        self._sink = emit
        self.events = events
        self.dispatcher = dispatcher
        self.tenant_policies = dict(tenant_policies or {})
        self.outbox = Outbox(events) if events is not None else None
        """Events on their way to the bus: ordered, bounded, never awaited by a run."""
        self.breakers: BreakerBoard = breakers or LocalBreakerBoard(self.clock)

    def emit(self, event: dict[str, Any]) -> None:
        """Progress events go to the local sink and, best effort, to the event bus (SSE)."""
        self._sink(event)
        if self.outbox is not None and "run_id" in event:
            self.outbox.put(event)

    async def dispatch(self, run_id: str) -> None:
        """Tell workers a run is queued (they also poll the store, so this only saves time)."""
        if self.dispatcher is not None:
            try:
                await self.dispatcher.dispatch(run_id)
            except Exception:
                log.warning("dispatch of %s failed; workers will find it by polling", run_id)

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
        record, _created = await self.submit_run(
            workflow, agent, input, tenant=tenant, idempotency_key=idempotency_key,
            budget=budget)
        return record

    async def submit_run(
        self,
        workflow: Workflow,
        agent: str,
        input: str,
        *,
        tenant: str = "local",
        idempotency_key: str | None = None,
        budget: dict[str, Any] | None = None,
        thread: ThreadRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        """Queue a run (the next turn of ``thread``, also reserving on the thread's ledger);
        ``False`` when the tenant's idempotency key already named a run."""
        workflow.agent(agent)  # unknown agents are refused before anything is stored
        problem = unstorable_text(input)  # as is text no store can keep (the CLI's stdin)
        if problem is not None:
            raise problem
        now = self.clock.now()
        run_id = f"run_{uuid.uuid4().hex[:16]}"
        merged = {**workflow.budget, **(budget or {})}
        if merged.get("deadline_seconds") is not None and "deadline" not in merged:
            merged["deadline"] = now + float(merged["deadline_seconds"])
        ledger = LedgerRecord(id=run_id, limits=limits_from_budget(merged))
        # Every execution of this tree (across resumes and workers) joins one trace.
        with tracing.get_tracer().start_as_current_span(
                f"submit {agent}", attributes={"alpaca.run.id": run_id}):
            traceparent = tracing.current_traceparent()
        run = RunRecord(
            id=run_id, tenant=tenant, agent=agent, workflow=workflow.ref, input=input,
            root_id=run_id, ancestry=[agent], idempotency_key=idempotency_key,
            budget=merged, created_at=now, updated_at=now,
            ledgers=[run_id, *([thread.ledger_id] if thread and thread.ledger_id else [])],
            traceparent=traceparent, thread_id=thread.id if thread else None,
        )
        audit = [AuditEvent(
            kind="run.created", actor=f"tenant:{tenant}",
            data={"agent": agent, "workflow": workflow.ref, "input": input,
                  "budget": merged, "requested_budget": budget or {},
                  **({"thread_id": thread.id} if thread else {})})]
        create = self.store.create_turn if thread else self.store.create_run
        record, _created = await create(run, audit, ledger=ledger)
        if _created:
            await self.dispatch(record.id)
        return record, _created

    async def run(self, workflow: Workflow, agent: str, input: str, **kw: Any) -> RunRecord:
        """Submit and execute the whole tree in this process (the embedded default)."""
        record, created = await self.submit_run(workflow, agent, input, **kw)
        return await self._run_tree(record.id, [record] if created else None)

    async def run_tree(self, root_id: str) -> RunRecord:
        """Execute queued runs of one tree, deepest first, until the root is terminal or
        waits on something no run here can finish (an approval). A root that ended here
        without ever delegating is a tree of one: it is returned as its end wrote it (no
        other run can be queued in that tree, nor can it change)."""
        return await self._run_tree(root_id)

    async def _run_tree(self, root_id: str, queued: list[RunRecord] | None = None) -> RunRecord:
        """:meth:`run_tree`; ``queued``: the tree's queued runs as a listing would give them
        now (a root just created: itself alone), so its first listing is not needed."""
        while True:
            if queued is None:
                queued = await self.store.list_runs(root_id=root_id, state=RunState.QUEUED,
                                                    limit=1000)
            if not queued:
                return await self.store.get_run(root_id)
            for run in sorted(queued, key=lambda r: (-r.depth, r.created_at)):
                record, alone = await self._execute(run.id)
                if alone and record is not None and record.id == root_id:
                    return record
            queued = None

    async def cancel(self, run_id: str, tenant: str | None = None) -> list[RunRecord]:
        """Cancel a run and its whole subtree (children first)."""
        run = await self.store.get_run(run_id, tenant)
        tree = await self.store.list_runs(root_id=run.root_id, limit=100_000)
        children = children_of(tree)
        order: list[RunRecord] = []

        def walk(r: RunRecord) -> None:
            for c in children.get(r.id, []):
                walk(c)
            order.append(r)

        walk(run)
        return [await self.store.request_cancel(r.id) for r in order]

    async def resume(self, run_id: str, *, force: bool = False) -> RunRecord:
        """Continue a run from its journal, taking over the lease only from a provably dead
        owner (expired, or a dead process on this host; ``force``: the owner the caller
        says is gone). The take-over is conditioned on the lease read here, so of two resumes
        started together exactly one wins and the other raises RunBusy."""
        run = await self.store.get_run(run_id)
        if run.state.terminal or run.state == RunState.WAITING:
            return run
        steal = run.state == RunState.RUNNING and (force or owner_is_dead_here(run.lease_owner))
        claimed = await self.store.claim_run(
            run_id, self.owner, self.lease_seconds, self.clock.now(), steal=steal,
            expected_epoch=run.epoch, max_attempts=self.max_run_attempts)
        if claimed is None:
            now = await self.store.get_run(run_id)
            if now.state.terminal or now.state == RunState.WAITING:
                return now  # finished (or quarantined) meanwhile: nothing to resume
            raise RunBusy(busy_message(now, self.clock.now()))
        return await self.drive(claimed)

    async def execute(self, run_id: str) -> RunRecord | None:
        return (await self._execute(run_id))[0]

    async def _execute(self, run_id: str) -> tuple[RunRecord | None, bool]:
        """:meth:`execute`, and whether the run is a root that ended without a child run
        (see :meth:`_drive`)."""
        claimed = await self.store.claim_run(run_id, self.owner, self.lease_seconds,
                                             self.clock.now(), max_attempts=self.max_run_attempts)
        if claimed is None:
            return None, False
        return await self._drive(claimed)

    async def workflow_for(self, run: RunRecord) -> Workflow:
        """The workflow a run was submitted to: a registered version (within the run's
        tenant), a file or a builtin."""
        return await self.load_workflow(run.tenant, run.workflow)

    async def load_workflow(self, tenant: str, ref: str) -> Workflow:
        """A recorded workflow ref (a run's, a thread's) loaded back, within ``tenant``."""
        if is_registry_ref(ref):
            return await self.registry.resolve(tenant, ref)
        return self.resolve(ref)

    # -- threads (DESIGN §10; threads.py) --------------------------------------------------------
    async def create_thread(self, *, agent: str, workflow: Workflow | str,
                            tenant: str = "local", title: str = "",
                            metadata: dict[str, Any] | None = None,
                            budget: dict[str, Any] | None = None) -> ThreadRecord:
        """A new conversation with ``agent`` of ``workflow`` (a Workflow, a registered name
        pinned to its version, or a ref such as ``builtin:demo``); ``budget`` limits the
        whole thread, across turns (each turn also has its run tree's own)."""
        return await threads.create_thread(self, agent=agent, workflow=workflow,
                                           tenant=tenant, title=title, metadata=metadata,
                                           budget=budget)

    async def send_message(self, thread_id: str, text: str, *, tenant: str = "local",
                           budget: dict[str, Any] | None = None,
                           idempotency_key: str | None = None) -> tuple[RunRecord, bool]:
        """Queue the next turn of a thread (not run here); see :func:`threads.send_message`."""
        return await threads.send_message(self, thread_id, text, tenant=tenant, budget=budget,
                                          idempotency_key=idempotency_key)

    async def chat(self, thread_id: str, text: str, *, tenant: str = "local",
                   budget: dict[str, Any] | None = None) -> RunRecord:
        """Send one message and run its turn in this process, like :meth:`run`: the turn's
        run, terminal or waiting for an approval. Its ``output`` is the answer (for a typed
        agent, the JSON text of its value: parse it with ``json.loads``)."""
        record, created = await self.send_message(thread_id, text, tenant=tenant,
                                                  budget=budget)
        return await self._run_tree(record.id, [record] if created else None)

    def chat_stream(self, thread_id: str, text: str | None = None, *, tenant: str = "local",
                    budget: dict[str, Any] | None = None, steps: bool = False) -> ChatStream:
        """:meth:`chat`, streamed: ``async for piece in engine.chat_stream(thread_id, text)``
        yields the answer as :class:`ChatDelta` pieces (``.text``) while the model writes
        it (with ``steps=True`` also a :class:`ChatStep` per tool call, delegation and
        approval request) and stops when the turn ends; the stream's ``.run`` is then the
        turn's run, as :meth:`chat` returns it. No ``text``: continue the thread's
        unfinished last turn. See chat_stream.py (what closing it early does)."""
        return ChatStream(self, thread_id, text, tenant=tenant, budget=budget, steps=steps)

    async def fork_thread(self, thread_id: str, turn: int, *,
                          tenant: str = "local") -> ThreadRecord:
        """A new thread sharing the first ``turn`` turns of ``thread_id`` (copied)."""
        return await threads.fork_thread(self, thread_id, turn, tenant=tenant)

    async def delete_thread(self, thread_id: str, *, tenant: str = "local",
                            actor: str = "user") -> ThreadRecord:
        """Erase a thread's content; its audit chain keeps the deleted runs' anchors."""
        return await threads.delete_thread(self, thread_id, tenant=tenant, actor=actor)

    async def drive(self, run: RunRecord) -> RunRecord:
        """Run the StepRunner under a heartbeat that renews the lease, inside one run span
        that lasts as long as this execution (the runner's task inherits it)."""
        return (await self._drive(run))[0]

    async def _drive(self, run: RunRecord) -> tuple[RunRecord, bool]:
        """:meth:`drive`, and whether the run is a root its runner ended, terminal, with no
        delegation in its journal: then its tree is that one run (a child is created only
        after its delegation step is journaled)."""
        try:
            workflow = await self.workflow_for(run)
        except (WorkflowError, NotFound) as exc:
            if isinstance(exc, WorkflowError) and exc.field.endswith(_UNREACHABLE):
                raise  # an MCP server down for now: the lease expires, the run is retried
            # A workflow that can no longer load (a file edited, a version gone, a setting
            # missing on this worker) ends the run with the reason instead of a crash loop.
            log.error("run %s: its workflow %s does not load: %s", run.id, run.workflow, exc)
            failed = await self.store.transition(
                run.id, RunState.FAILED, self.clock.now(), epoch=run.epoch,
                error_code=str(ErrorCode.CONFIG_ERROR),
                error_message=f"workflow {run.workflow} does not load: {exc}")
            if failed.parent_id:
                await self.wake_parent(failed.parent_id)
            return failed, False
        runner = StepRunner(run, workflow, self.store, clock=self.clock,
                            breakers=self.breakers, emit=self.emit, on_queued=self.dispatch,
                            tenant_policy=self.tenant_policies.get(run.tenant, OPEN_POLICY))
        with tracing.run_span(run.id, run.agent, tenant=run.tenant,
                              parent_traceparent=run.traceparent, epoch=run.epoch) as span:
            task = asyncio.ensure_future(runner.run())
            beat = asyncio.ensure_future(self._heartbeat(run, task))
            try:
                record = await task
                tracing.end_run(span, str(record.state), record.error_code,
                                record.error_message)
                if record.parent_id and record.state.terminal:
                    await self.wake_parent(record.parent_id)
                return record, (record.state.terminal and record.parent_id is None
                                and runner.delegated is False)
            except LeaseLost as exc:
                log.warning("run %s: lease lost, another worker owns it now", run.id)
                tracing.mark_error(span, str(exc.code), exc.message)
                return await self.store.get_run(run.id), False
            except asyncio.CancelledError:
                if task.cancelled() and beat.done() and not beat.cancelled():
                    tracing.mark_error(span, str(ErrorCode.LEASE_LOST),
                                       "the heartbeat lost the lease")
                    return await self.store.get_run(run.id), False
                raise
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await beat

    async def wake_parent(self, parent_id: str) -> None:
        """A finished child requeues its waiting parent (the reaper is the safety net)."""
        with contextlib.suppress(NotFound):
            if await wake_if_ready(self.store, await self.store.get_run(parent_id),
                                   self.clock.now()):
                await self.dispatch(parent_id)

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
            except Unavailable as exc:  # disk full, database restarting: try next beat
                log.info("run %s: lease not renewed: %s", run.id, exc)

    async def release(self, run_id: str, epoch: int) -> None:
        """Hand a running run back to the queue (graceful shutdown)."""
        with contextlib.suppress(LeaseLost):
            await self.store.transition(
                run_id, RunState.QUEUED, self.clock.now(), epoch=epoch,
                audit=[AuditEvent(kind="lease.released", actor=f"worker:{self.owner}")])

    async def reap(self) -> list[str]:
        """Requeue runs whose lease expired or whose local owner process died (quarantining
        those that crashed their workers ``max_run_attempts`` times)."""
        requeued = await self.store.requeue_expired(self.clock.now(),
                                                    max_attempts=self.max_run_attempts)
        for run in await self.store.list_runs(state=RunState.RUNNING, limit=10_000):
            if owner_is_dead_here(run.lease_owner):
                claimed = await self.store.claim_run(
                    run.id, self.owner, self.lease_seconds, self.clock.now(), steal=True,
                    expected_epoch=run.epoch, max_attempts=self.max_run_attempts)
                if claimed is not None:
                    await self.release(run.id, claimed.epoch)
                    requeued.append(run.id)
        for approval in await self.store.expire_approvals(self.clock.now()):
            requeued.append(approval.run_id)
        requeued += await wake_finished_waiters(self.store, self.clock.now())
        for run_id in requeued:
            await self.dispatch(run_id)
        return requeued

"""Threads (DESIGN §10): create, send a message (one turn), fork, delete; used by the Engine
(``engine.create_thread`` / ``engine.chat`` ...), the HTTP API and the command line.

A turn is an ordinary run of the thread's agent with ``thread_id`` and ``turn``: same
lifecycle, journal, budget ledger and audit chain; its runner rebuilds the earlier turns
from their journals (history.py). Turns run strictly one after the other: a message while
the last turn is queued, running or waiting is refused (``TurnInProgress``, HTTP 409) by the
store, atomically.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from .budget import limits_from_budget
from .errors import NotFound
from .forks import ForkPastEnd, copy_turn
from .store.records import AuditEvent, LedgerRecord, RunRecord, ThreadRecord
from .store.thread_rules import check_deletable
from .workflow import Workflow
from .workflows.registry import is_registry_ref, parse_name
from .workflows.schema import WorkflowError

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ForkPastEnd", "ThreadWorkflowGone", "create_thread", "delete_thread",
           "fork_thread", "send_message"]


class ThreadWorkflowGone(Exception):
    """The workflow a thread pinned no longer loads here (a file edited or removed, a
    version gone), or no longer has the thread's agent: no turn can run."""

    def __init__(self, thread: ThreadRecord, cause: BaseException) -> None:
        reason = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
        super().__init__(f"thread {thread.id}: its workflow {thread.workflow} does not load "
                         f"for agent {thread.agent!r}: {reason}")


def new_thread_id() -> str:
    return f"thr_{uuid.uuid4().hex[:16]}"


def _ledger(thread_id: str, budget: dict[str, Any] | None) -> LedgerRecord | None:
    """The thread's own ledger, when it has a budget: every turn also reserves on it."""
    limits = limits_from_budget(budget or {})
    return LedgerRecord(id=thread_id, limits=limits) if limits else None


async def thread_workflow(engine: Engine, tenant: str, workflow: Workflow | str) -> Workflow:
    """The workflow a thread pins: a Workflow as given, a registered name (``NAME``,
    ``NAME@V``) resolved to its version in ``tenant``, or a ref the engine resolves."""
    if isinstance(workflow, Workflow):
        return workflow
    if parse_name(workflow) is not None:
        return await engine.registry.resolve(tenant, workflow)
    return engine.resolve(workflow)


async def create_thread(engine: Engine, *, agent: str, workflow: Workflow | str,
                        tenant: str = "local", title: str = "",
                        metadata: dict[str, Any] | None = None,
                        budget: dict[str, Any] | None = None) -> ThreadRecord:
    """Store a new thread of ``agent``; KeyError for an agent the workflow does not have."""
    wf = await thread_workflow(engine, tenant, workflow)
    wf.agent(agent)
    pinned = parse_name(wf.ref) if is_registry_ref(wf.ref) else None
    now = engine.clock.now()
    thread_id = new_thread_id()
    ledger = _ledger(thread_id, budget)
    thread = ThreadRecord(id=thread_id, tenant=tenant, agent=agent, workflow=wf.ref,
                          workflow_version=pinned[1] if pinned else None, title=title,
                          metadata=dict(metadata or {}), budget=dict(budget or {}),
                          ledger_id=ledger.id if ledger else None, created_at=now,
                          updated_at=now)
    return await engine.store.create_thread(thread, [AuditEvent(
        kind="thread.created", actor=f"tenant:{tenant}",
        data={"agent": agent, "workflow": wf.ref, "budget": thread.budget})], ledger)


async def send_message(engine: Engine, thread_id: str, text: str, *, tenant: str = "local",
                       budget: dict[str, Any] | None = None,
                       idempotency_key: str | None = None) -> tuple[RunRecord, bool]:
    """Queue the next turn of a thread (``False``: the idempotency key named a run already).

    NotFound for an absent, deleted or foreign thread; TurnInProgress while the last turn is
    unfinished; ThreadWorkflowGone when its pinned workflow no longer loads. ``alpaca chat``
    and the API call this; ``engine.chat`` also runs the turn."""
    thread = await engine.store.get_thread(thread_id, tenant)
    try:
        workflow = await engine.load_workflow(tenant, thread.workflow)
        workflow.agent(thread.agent)
    except (WorkflowError, NotFound, KeyError) as exc:
        raise ThreadWorkflowGone(thread, exc) from exc
    return await engine.submit_run(workflow, thread.agent, text, tenant=tenant,
                                   idempotency_key=idempotency_key, budget=budget,
                                   thread=thread)


async def fork_thread(engine: Engine, thread_id: str, turn: int, *,
                      tenant: str = "local") -> ThreadRecord:
    """A new thread sharing the first ``turn`` turns (copies; see forks.py). ForkPastEnd
    past the last turn; TurnInProgress when a shared turn has not finished."""
    store = engine.store
    source = await store.get_thread(thread_id, tenant)
    turns = await store.list_turns(thread_id)
    last = max((t.turn or 0 for t in turns), default=0)
    if turn < 0 or turn > last:
        raise ForkPastEnd(thread_id, turn, last)
    shared = [t for t in turns if (t.turn or 0) <= turn]
    check_deletable(thread_id, shared)
    now = engine.clock.now()
    fork_id = new_thread_id()
    ledger = _ledger(fork_id, source.budget)
    fork = source.model_copy(update={
        "id": fork_id, "forked_from": source.id, "forked_turn": turn, "created_at": now,
        "updated_at": now, "ledger_id": ledger.id if ledger else None, "deleted_at": None})
    actor = f"tenant:{tenant}"
    copies = [copy_turn(t, await store.list_steps(t.id), thread_id=fork_id,
                        run_id=f"run_{uuid.uuid4().hex[:16]}", actor=actor) for t in shared]
    return await store.fork_thread(fork, copies, [
        AuditEvent(kind="thread.created", actor=actor, data={
            "agent": fork.agent, "workflow": fork.workflow, "budget": fork.budget}),
        AuditEvent(kind="thread.forked", actor=actor, data={
            "source_thread_id": source.id, "turn": turn,
            "turns": [{"turn": c.run.turn, "run_id": c.run.id,
                       "source_run_id": t.id} for c, t in zip(copies, shared, strict=True)]}),
    ], ledger)


async def delete_thread(engine: Engine, thread_id: str, *, tenant: str = "local",
                        actor: str = "user") -> ThreadRecord:
    """Erase the thread's content, keeping its audit anchors (see Store.delete_thread)."""
    return await engine.store.delete_thread(thread_id, engine.clock.now(), tenant=tenant,
                                            actor=actor)

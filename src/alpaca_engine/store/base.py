"""The Store protocol: runs, steps, audit, approvals, keys, workflows and threads behind one
interface.

Every mutation of a leased run carries the lease epoch; a store refuses a write whose epoch
is stale (``LeaseLost``), so a worker paused past its lease cannot write anything. Audit
events passed with a write are appended in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..lifecycle import RunState
from ..telemetry.audit import AuditRecord
from .records import (
    ApiKeyRecord,
    ApprovalRecord,
    ApprovalStatus,
    AuditEvent,
    LedgerRecord,
    RunRecord,
    StepRecord,
    ThreadRecord,
    TurnCopy,
    WorkflowRecord,
)


@dataclass(frozen=True)
class RunFlags:
    """What a journal write saw on the run row under its lock: all the runner's interrupt
    check needs, so a store that returns it from ``save_step`` saves a run re-read a turn."""

    epoch: int
    cancel_requested: bool


@dataclass
class StepWrite:
    """One journal write of :meth:`Store.save_steps`: what :meth:`Store.save_step` takes."""

    step: StepRecord
    audit: Sequence[AuditEvent] = ()
    reserve: dict[str, float] | None = None
    settle: dict[str, float] | None = None


@dataclass(frozen=True)
class Journaled:
    """What :meth:`Store.save_steps` did: ``skipped`` when the last write was not made
    because the run has a cancel request (``unless_cancelled``); ``flags`` as the last
    write saw them, or None (the runner re-reads the run)."""

    flags: RunFlags | None
    skipped: bool = False


class Store(Protocol):
    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    async def close(self) -> None: ...

    async def create_run(
        self, run: RunRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        """Insert a queued run (and its budget ledger, if given); with an idempotency key
        already used by the tenant, return the existing run and ``False``."""

    async def get_run(self, run_id: str, tenant: str | None = None) -> RunRecord:
        """Raise NotFound when absent or owned by another tenant."""

    async def list_runs(
        self,
        *,
        tenant: str | None = None,
        state: RunState | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        limit: int = 100,
    ) -> list[RunRecord]: ...

    async def claim_run(
        self, run_id: str, owner: str, lease_seconds: float, now: float, *, steal: bool = False,
        expected_epoch: int | None = None, max_attempts: int | None = None,
    ) -> RunRecord | None:
        """Lease a queued run (or a running one whose lease expired, or one the caller judged
        dead when ``steal``: with ``expected_epoch`` only if its lease is still that epoch's,
        re-checked in the claim's transaction); bump the epoch. Taking a running run over is
        a crash recovery: counted, and at ``max_attempts`` the run is quarantined (``failed``
        with ``crash_loop``). ``None`` when it cannot be claimed."""

    async def claim_next(self, owner: str, lease_seconds: float, now: float) -> RunRecord | None:
        """Lease the oldest queued run."""

    async def renew_lease(
        self, run_id: str, owner: str, epoch: int, lease_seconds: float, now: float
    ) -> None:
        """Extend the lease; raise LeaseLost when the epoch is stale."""

    async def transition(
        self,
        run_id: str,
        to: RunState,
        now: float,
        *,
        epoch: int | None = None,
        output: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        usage: dict[str, Any] | None = None,
        audit: Sequence[AuditEvent] = (),
        output_type: str | None = None,
        steps: Sequence[StepWrite] = (),
    ) -> RunRecord:
        """Move a run along the lifecycle table. ``epoch=None`` is an actor without a lease
        (cancel, reaper); it may not touch a running run's journal. ``output_type``
        (``text``/``json``) is written with ``output`` when given.

        ``steps`` (the lease owner's, ``epoch`` required): journal writes made first, exactly
        as :meth:`save_steps` makes them, in the same commit as the move, so a run's last
        outcome and its end (or pause) cost one commit. A write that raises (LeaseLost,
        BudgetExceeded) keeps the ones before it, as :meth:`save_steps` does, and the move is
        not made. :func:`save_in_turn` then the move is the plain form a store may use."""

    async def request_cancel(self, run_id: str, tenant: str | None = None) -> RunRecord:
        """Cancel a queued or waiting run now; flag a running one for its worker to stop."""

    async def requeue_expired(self, now: float, *, max_attempts: int | None = None) -> list[str]:
        """Reaper: running runs whose lease expired go back to queued (epoch bumped, crash
        counted), or are quarantined at ``max_attempts``; returns the requeued ids."""

    async def save_step(
        self, step: StepRecord, epoch: int, audit: Sequence[AuditEvent] = (),
        *, reserve: dict[str, float] | None = None, settle: dict[str, float] | None = None,
    ) -> RunFlags | None:
        """Insert or update step ``(run_id, seq)``; fenced by epoch (a finished run refuses
        every journal write: its audit chain ends with its terminal record). ``reserve``
        debits every ledger of the run atomically with the write (once per step, even across
        a crash) or raises BudgetExceeded and marks the ledger exhausted; ``settle`` adds
        actual-minus-reserved usage. May return the run's flags as the write saw them
        (``None``: the runner re-reads the run for its interrupt check)."""

    async def save_steps(
        self, writes: Sequence[StepWrite], epoch: int, *, unless_cancelled: bool = False,
    ) -> Journaled:
        """The writes of ``writes`` in order, each exactly as :meth:`save_step` would make
        it, so a step's outcome and the next step's ``started`` cost one commit. A write that
        raises (LeaseLost, BudgetExceeded) stops the rest; the ones before it are written.
        With ``unless_cancelled`` the last write is made only if the run has no cancel
        request, read under the run's lock after the others (``Journaled.skipped``): the
        runner's interrupt check before a model turn, in the same commit.
        :func:`save_in_turn` is the plain form any store may use. The writes pending when a
        run ends or pauses go with the move instead (:meth:`transition`, ``steps``)."""

    async def get_ledger(self, ledger_id: str) -> LedgerRecord: ...

    async def list_steps(self, run_id: str) -> list[StepRecord]: ...

    async def append_audit(
        self, run_id: str, events: Sequence[AuditEvent], now: float, *, epoch: int | None = None
    ) -> None: ...

    async def list_audit(self, run_id: str, after_seq: int = 0) -> list[AuditRecord]: ...

    async def create_approval(
        self, approval: ApprovalRecord, epoch: int, audit: Sequence[AuditEvent] = ()
    ) -> ApprovalRecord:
        """Record a pending approval (at most one per run step; returns the existing one)."""

    async def get_approval(self, approval_id: str, tenant: str | None = None) -> ApprovalRecord:
        ...

    async def get_step_approval(self, run_id: str, step: int) -> ApprovalRecord | None: ...

    async def list_approvals(
        self, *, tenant: str | None = None, status: ApprovalStatus | None = None,
        run_id: str | None = None, limit: int = 100,
    ) -> list[ApprovalRecord]: ...

    async def decide_approval(
        self, approval_id: str, *, approve: bool, by: str, comment: str | None, now: float,
        tenant: str | None = None,
    ) -> ApprovalRecord:
        """Decide a pending approval and requeue its waiting run in the same transaction;
        ApprovalConflict when it is no longer pending."""

    async def expire_approvals(self, now: float) -> list[ApprovalRecord]: ...

    async def create_api_key(self, key: ApiKeyRecord) -> ApiKeyRecord: ...

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The active (not revoked) key with this hash."""

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyRecord]: ...

    async def put_workflow(self, workflow: WorkflowRecord) -> tuple[WorkflowRecord, bool]:
        """Store a new version of ``(tenant, name)``: the next number after the latest.

        When the latest version already has this ``content_hash``, return it and ``False``
        (nothing stored). Concurrent puts of one name never get the same number (a unique
        key on tenant, name, version, and a retry on conflict)."""

    async def get_workflow(self, tenant: str, name: str,
                           version: int | None = None) -> WorkflowRecord:
        """One version (``None``: the latest); NotFound when absent or another tenant's."""

    async def list_workflows(self, tenant: str) -> list[WorkflowRecord]:
        """The latest version of each of the tenant's workflows, by name."""

    async def list_workflow_versions(self, tenant: str, name: str) -> list[WorkflowRecord]:
        """Every version of one workflow, newest first (empty when there is none)."""

    # -- threads (DESIGN §10) -------------------------------------------------------------------
    async def create_thread(
        self, thread: ThreadRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> ThreadRecord:
        """Insert a thread (and its budget ledger), starting its audit chain with ``audit``."""

    async def get_thread(self, thread_id: str, tenant: str | None = None, *,
                         deleted: bool = False) -> ThreadRecord:
        """NotFound when absent, another tenant's, or deleted (unless ``deleted``)."""

    async def list_threads(self, *, tenant: str | None = None,
                           limit: int = 100) -> list[ThreadRecord]:
        """Threads not deleted, most recently active first (``updated_at``, then id)."""

    async def create_turn(
        self, run: RunRecord, audit: Sequence[AuditEvent] = (),
        ledger: LedgerRecord | None = None,
    ) -> tuple[RunRecord, bool]:
        """Insert ``run`` as the next turn of ``run.thread_id`` (its ``turn`` is assigned
        here) and bump the thread's ``updated_at``, atomically: TurnInProgress when the last
        turn is not terminal, so two concurrent messages never both become turn N (a unique
        ``(thread_id, turn)`` key guards it too). With an idempotency key the tenant already
        used, the existing run and ``False`` (before any other check). NotFound when the
        thread is absent or deleted."""

    async def list_turns(self, thread_id: str) -> list[RunRecord]:
        """The turn runs of a thread, in turn order."""

    async def fork_thread(self, thread: ThreadRecord, copies: Sequence[TurnCopy],
                          audit: Sequence[AuditEvent] = (),
                          ledger: LedgerRecord | None = None) -> ThreadRecord:
        """Insert the fork ``thread`` with its copied turns (runs, steps, each copy's audit
        chain) and the thread's chain, in one transaction; NotFound when the source thread
        (``thread.forked_from``) was deleted meanwhile."""

    async def delete_thread(self, thread_id: str, now: float, *, tenant: str | None = None,
                            actor: str = "user") -> ThreadRecord:
        """Erase a thread's content in one transaction: its turns' run trees lose their
        input, output, error text, steps, audit records and approval arguments; the thread
        its title and metadata. The rows stay as tombstones, and the thread's chain gets a
        ``thread.deleted`` record anchoring each erased run's chain head (last seq and hash).
        TurnInProgress when a turn is not terminal; NotFound as :meth:`get_thread`."""

    async def list_thread_audit(self, thread_id: str, after_seq: int = 0) -> list[AuditRecord]:
        """The thread's own hash chain (created, turns, fork, deletion): it survives delete."""


async def save_in_turn(
    store: Store, writes: Sequence[StepWrite], epoch: int, *, unless_cancelled: bool = False,
    flags: RunFlags | None = None,
) -> Journaled:
    """:meth:`Store.save_steps` as one :meth:`Store.save_step` after another (a commit
    each); the cancel check of ``unless_cancelled`` reads the flags the previous write
    returned (``flags``: what a write just before these saw), or the run."""
    for index, write in enumerate(writes):
        if unless_cancelled and index == len(writes) - 1:
            if flags is None:
                run = await store.get_run(write.step.run_id)
                flags = RunFlags(run.epoch, run.cancel_requested)
            if flags.cancel_requested:
                return Journaled(flags, skipped=True)
        flags = await store.save_step(write.step, epoch, write.audit, reserve=write.reserve,
                                      settle=write.settle)
    return Journaled(flags)

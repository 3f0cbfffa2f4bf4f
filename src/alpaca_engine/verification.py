"""Verify a stored run's audit chain against the head its run row carries (DESIGN §7).

Shared by ``alpaca audit verify`` (one run, a tree, or ``--all``) and
``GET /v1/runs/{id}/audit/verify``, so every caller applies the same rules: the chain's own
hashes and links, its length against the run's head (records deleted from the end, or the
whole chain), and for a finished run its last record being the terminal state change.

A run erased with its thread (DESIGN §10: ``DELETE /v1/threads/{id}``) has no chain left by
design: it verifies as **deleted, anchored** when the thread's own chain verifies and its
``thread.deleted`` record holds exactly the head the run's row still carries; anything else
about it is tampering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import NotFound
from .store.base import Store
from .store.records import RunRecord
from .telemetry.audit import AuditRecord, VerifyResult, verify_chain


@dataclass(frozen=True)
class Anchor:
    """Where an erased run's chain head is kept: a record of its deleted thread's chain."""

    thread_id: str
    seq: int


@dataclass(frozen=True)
class RunVerification:
    run_id: str
    head_seq: int
    result: VerifyResult
    anchor: Anchor | None = None
    """Set for a run erased with its thread (its content and chain deleted on purpose)."""


def find_anchor(records: Sequence[AuditRecord],
                run_id: str) -> tuple[AuditRecord, dict[str, Any]] | None:
    """The ``thread.deleted`` record of a thread's chain naming ``run_id``, and its entry."""
    for record in records:
        if record.kind == "thread.deleted":
            for entry in record.data.get("runs", []):
                if isinstance(entry, dict) and entry.get("run_id") == run_id:
                    return record, entry
    return None


def verify_anchor(run: RunRecord, thread_id: str, records: Sequence[AuditRecord],
                  key: bytes | None) -> RunVerification:
    """An erased run against its thread's chain: the chain intact, the run's head in it."""
    def bad(reason: str) -> RunVerification:
        return RunVerification(run.id, run.audit_seq, VerifyResult(False, 0, 1, reason))

    chain = verify_chain(records, key=key, run_id=thread_id)
    if not chain.ok:
        return bad(f"erased with thread {thread_id}, whose audit chain is broken at seq "
                   f"{chain.first_bad_seq}: {chain.reason}")
    found = find_anchor(records, run.id)
    if found is None:
        return bad(f"no record of thread {thread_id}'s chain anchors this run (its records "
                   "are gone without a deletion)")
    record, entry = found
    if (entry.get("audit_seq"), entry.get("audit_hash")) != run.audit_head:
        return bad(f"the run's head (seq {run.audit_seq}) is not the one anchored in record "
                   f"{record.seq} of thread {thread_id}'s chain (seq {entry.get('audit_seq')})")
    return RunVerification(run.id, run.audit_seq, VerifyResult(True, 0),
                           Anchor(thread_id, record.seq))


async def erased_with(store: Store, run: RunRecord) -> str | None:
    """The deleted thread whose deletion erased ``run`` (a turn, or a run of a turn's tree)."""
    thread_id = run.thread_id
    if thread_id is None and run.root_id != run.id:
        try:
            thread_id = (await store.get_run(run.root_id)).thread_id
        except NotFound:
            return None
    if thread_id is None:
        return None
    try:
        thread = await store.get_thread(thread_id, deleted=True)
    except NotFound:
        return None
    return thread.id if thread.deleted_at is not None else None


async def verify_run(store: Store, run: RunRecord, key: bytes | None) -> RunVerification:
    """Verify one run: its row (read before its records, so appends made meanwhile are
    accepted after the head) and its chain, or the anchor of an erased run."""
    thread_id = await erased_with(store, run)
    if thread_id is not None:
        return verify_anchor(run, thread_id, await store.list_thread_audit(thread_id), key)
    records = await store.list_audit(run.id)
    result = verify_chain(records, key=key, run_id=run.id, head=run.audit_head,
                          terminal_state=str(run.state) if run.state.terminal else None)
    return RunVerification(run.id, run.audit_seq, result)


async def verify_runs(store: Store, runs: Iterable[RunRecord],
                      key: bytes | None) -> list[RunVerification]:
    return [await verify_run(store, run, key) for run in runs]

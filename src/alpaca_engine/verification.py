"""Verify a stored run's audit chain against the head its run row carries (DESIGN §7).

Shared by ``alpaca audit verify`` (one run, a tree, or ``--all``) and
``GET /v1/runs/{id}/audit/verify``, so every caller applies the same rules: the chain's own
hashes and links, its length against the run's head (records deleted from the end, or the
whole chain), and for a finished run its last record being the terminal state change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .store.base import Store
from .store.records import RunRecord
from .telemetry.audit import VerifyResult, verify_chain


@dataclass(frozen=True)
class RunVerification:
    run_id: str
    head_seq: int
    result: VerifyResult


async def verify_run(store: Store, run: RunRecord, key: bytes | None) -> RunVerification:
    """Verify one run: its row (read before its records, so appends made meanwhile are
    accepted after the head) and its chain."""
    records = await store.list_audit(run.id)
    result = verify_chain(records, key=key, run_id=run.id, head=run.audit_head,
                          terminal_state=str(run.state) if run.state.terminal else None)
    return RunVerification(run.id, run.audit_seq, result)


async def verify_runs(store: Store, runs: Iterable[RunRecord],
                      key: bytes | None) -> list[RunVerification]:
    return [await verify_run(store, run, key) for run in runs]

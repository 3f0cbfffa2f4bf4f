"""Who may own a run, as pure logic shared by every store (DESIGN §3, §7).

* **Takeover**: a claim may take a running run only from a provably dead owner: its lease
  expired (checked inside the claim's transaction), or the caller judged the owner dead and
  the lease is still the one it judged (same epoch). A live owner is never preempted.
* **Crash recovery**: a run whose owner crashed is requeued (or taken over) with its crash
  counter bumped. A run that keeps crashing its workers (a native crash or ``os._exit`` in a
  tool) would otherwise be requeued for ever and take a worker down each time, so at
  ``max_attempts`` crashed attempts it is quarantined instead: ``failed`` with ``crash_loop``,
  audited. Legitimate re-claims (after a wait, an approval, a graceful release) do not count.
* **A finished run's chain is closed**: it ends with the terminal ``state.changed`` record, so
  nothing is appended after it (a late decision is refused, a late expiry not audited there).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ErrorCode
from ..lifecycle import RunState, check_transition
from .records import AuditEvent, RunRecord

DEFAULT_MAX_RUN_ATTEMPTS = 5


@dataclass(frozen=True)
class Recovery:
    """What a store writes for one crash recovery: the new state, counter and audit events
    (the ``state.changed`` record last, so a quarantined run's chain ends with it)."""

    state: RunState
    crash_count: int
    events: tuple[AuditEvent, ...]
    error_code: str | None = None
    error_message: str | None = None

    @property
    def quarantined(self) -> bool:
        return self.state == RunState.FAILED


def recover(run: RunRecord, why: str, max_attempts: int | None) -> Recovery:
    """Recover a running run whose owner crashed; ``why`` says how the crash was seen.

    ``max_attempts`` None never quarantines (a store used directly, without an engine)."""
    crashes = run.crash_count + 1
    if max_attempts is None or crashes < max_attempts:
        check_transition(run.id, run.state, RunState.QUEUED)
        return Recovery(RunState.QUEUED, crashes, (AuditEvent(kind="state.changed", data={
            "from": str(run.state), "to": str(RunState.QUEUED), "reason": why,
            "crash_count": crashes}),))
    code = str(ErrorCode.CRASH_LOOP)
    message = (f"quarantined: the run crashed its worker {crashes} times "
               f"(ALPACA_MAX_RUN_ATTEMPTS={max_attempts}); last: {why}")
    check_transition(run.id, run.state, RunState.FAILED, code)
    return Recovery(RunState.FAILED, crashes, (
        AuditEvent(kind="run.quarantined", data={
            "crash_count": crashes, "max_attempts": max_attempts, "reason": why}),
        AuditEvent(kind="state.changed", data={
            "from": str(run.state), "to": str(RunState.FAILED), "reason": message,
            "error_code": code}),
    ), code, message)


def takeover(
    run: RunRecord, now: float, *, steal: bool, expected_epoch: int | None,
    max_attempts: int | None,
) -> Recovery | None:
    """Whether a claim may take a *running* run from its owner, and how; None: it may not.

    An expired lease may always be taken (re-checked here, inside the claim's transaction).
    ``steal`` takes a live-looking lease, but with ``expected_epoch`` only the lease of that
    epoch, the one the caller judged dead: a lease someone else took since is never preempted.
    """
    expired = run.lease_expires_at is not None and run.lease_expires_at < now
    stolen = steal and (expected_epoch is None or run.epoch == expected_epoch)
    if not (expired or stolen):
        return None
    why = (f"lease of {run.lease_owner} expired" if expired
           else f"lease taken over from {run.lease_owner}")
    return recover(run, why, max_attempts)


@dataclass(frozen=True)
class ClaimPlan:
    """What a claim writes: the audit events (a take-over's requeue, then ``claimed by``) and
    the crash counter; or, with ``quarantine``, the recovery to write instead of claiming."""

    events: tuple[AuditEvent, ...]
    crash_count: int
    quarantine: Recovery | None = None


def plan_claim(
    run: RunRecord, owner: str, now: float, *, steal: bool = False,
    expected_epoch: int | None = None, max_attempts: int | None = None,
) -> ClaimPlan | None:
    """How ``owner`` may lease ``run`` (read in the claim's transaction); None: it may not."""
    events: list[AuditEvent] = []
    state, crashes = run.state, run.crash_count
    if state == RunState.RUNNING:
        rec = takeover(run, now, steal=steal, expected_epoch=expected_epoch,
                       max_attempts=max_attempts)
        if rec is None:
            return None
        if rec.quarantined:
            return ClaimPlan((), rec.crash_count, rec)
        events.extend(rec.events)
        state, crashes = RunState.QUEUED, rec.crash_count
    if state != RunState.QUEUED:
        return None
    check_transition(run.id, state, RunState.RUNNING)
    events.append(AuditEvent(kind="state.changed", data={
        "from": str(state), "to": str(RunState.RUNNING), "reason": f"claimed by {owner}"}))
    return ClaimPlan(tuple(events), crashes)


def closed_run_decision(approval_id: str, run: RunRecord) -> str:
    """Why a decision on a finished run's approval is refused (nothing is left to decide)."""
    return (f"approval {approval_id}: run {run.id} is already {run.state}; the decision "
            "would have no effect")

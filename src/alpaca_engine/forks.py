"""Forks of a thread (DESIGN §10): copies of its first K turns, as pure logic.

A fork **copies** each shared turn's run record and journal into the new thread rather than
referencing them, so it lives on when its source thread is deleted. A copy is never
executed (it is terminal): the new thread's next turn replays its history from the copies'
journals like any other, and no tool runs again. Each copy starts its own audit chain with
``run.forked`` (the source run and the head of the source's chain, so the copy can be traced
to a verifiable original) and ends it with the terminal state change every finished run's
chain ends with.
"""

from __future__ import annotations

from collections.abc import Sequence

from .store.records import AuditEvent, RunRecord, StepRecord, TurnCopy


class ForkPastEnd(ValueError):
    """A fork asked for more turns than the thread has."""

    def __init__(self, thread_id: str, turn: int, last: int) -> None:
        super().__init__(f"thread {thread_id} has {last} turn(s); a fork can share turns 0 to "
                         f"{last}, not {turn}")


def copy_turn(source: RunRecord, steps: Sequence[StepRecord], *, thread_id: str, run_id: str,
              actor: str) -> TurnCopy:
    """The copy of a finished turn for the fork ``thread_id``, under the new id ``run_id``."""
    run = source.model_copy(update={
        "id": run_id, "root_id": run_id, "thread_id": thread_id, "ledgers": [],
        "idempotency_key": None, "lease_owner": None, "lease_expires_at": None, "epoch": 0,
        "cancel_requested": False, "crash_count": 0})
    audit = [
        AuditEvent(kind="run.forked", actor=actor, data={
            "source_run_id": source.id, "source_thread_id": source.thread_id,
            "thread_id": thread_id, "turn": source.turn, "agent": source.agent,
            "workflow": source.workflow, "source_audit_seq": source.audit_seq,
            "source_audit_hash": source.audit_hash}),
        AuditEvent(kind="state.changed", actor=actor, data={
            "from": None, "to": str(source.state),
            "reason": f"copied from run {source.id} (turn {source.turn} of thread "
                      f"{source.thread_id})"}),
    ]
    return TurnCopy(run=run, steps=[s.model_copy(update={"run_id": run_id}) for s in steps],
                    audit=audit)

"""The thread rules every store applies inside its transactions (pure: no I/O).

One place decides the next turn number, refuses a message while a turn is unfinished, and
writes the audit data of a turn and of a deletion, so SQLite, PostgreSQL and MongoDB cannot
drift apart on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import TurnInProgress
from .records import AuditEvent, RunRecord


@dataclass(frozen=True)
class Erased:
    """A run whose content a deletion erased, with its audit chain head at that moment."""

    run_id: str
    turn: int | None
    seq: int
    hash: str


def next_turn(thread_id: str, last: RunRecord | None) -> int:
    """The number of the turn after ``last``; TurnInProgress while ``last`` is unfinished."""
    if last is None:
        return 1
    if not last.state.terminal:
        raise TurnInProgress(thread_id, last.id, last.turn or 0)
    return (last.turn or 0) + 1


def check_deletable(thread_id: str, turns: Sequence[RunRecord]) -> None:
    """A thread whose last turn still runs cannot be erased under its worker's feet."""
    for run in turns:
        if not run.state.terminal:
            raise TurnInProgress(thread_id, run.id, run.turn or 0)


def turn_created(run: RunRecord) -> AuditEvent:
    """The thread chain's record of a new turn (no content: the message is the run's)."""
    return AuditEvent(kind="turn.created", actor=f"tenant:{run.tenant}",
                      data={"turn": run.turn, "run_id": run.id})


def thread_deleted(erased: Sequence[Erased], actor: str) -> AuditEvent:
    """The anchor record: each erased run's chain head, so `alpaca audit verify` can tell an
    erased chain from a tampered one."""
    return AuditEvent(kind="thread.deleted", actor=actor, data={
        "runs": [{"run_id": e.run_id, "turn": e.turn, "audit_seq": e.seq,
                  "audit_hash": e.hash} for e in erased]})


ERASED = ""
"""What a deleted thread's title, and an erased run's input, become."""

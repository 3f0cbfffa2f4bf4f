"""The run lifecycle: states and the one table of legal transitions (DESIGN §3).

Pure logic, no I/O: the stores call :func:`check_transition` before every state change, so an
illegal move raises wherever it is attempted.
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.TIMED_OUT}
)

S = RunState
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.TIMED_OUT}),
    S.RUNNING: frozenset(
        {S.WAITING, S.QUEUED, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMED_OUT}
    ),
    S.WAITING: frozenset({S.QUEUED, S.CANCELLED, S.TIMED_OUT, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.TIMED_OUT: frozenset(),
}

# Every terminal state except success must say why; these are the states that need an error.
NEEDS_ERROR = frozenset({S.FAILED, S.CANCELLED, S.TIMED_OUT})


class IllegalTransition(Exception):
    def __init__(self, run_id: str, src: RunState, dst: RunState) -> None:
        super().__init__(f"run {run_id}: illegal transition {src} -> {dst}")
        self.src = src
        self.dst = dst


def can_transition(src: RunState, dst: RunState) -> bool:
    return dst in TRANSITIONS[src]


def check_transition(
    run_id: str, src: RunState, dst: RunState, error_code: str | None = None
) -> None:
    """Raise unless ``src -> dst`` is legal and a failing terminal state carries a reason."""
    if not can_transition(src, dst):
        raise IllegalTransition(run_id, src, dst)
    if dst in NEEDS_ERROR and not error_code:
        raise ValueError(f"run {run_id}: {dst} needs an error code")

"""Error codes shared by the runner, the API and the command line.

One enum so that a code means the same thing in the journal, the audit log, HTTP problems
and exit messages.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Refusals returned to the model as a structured tool result (it may recover).
    UNKNOWN_TOOL = "unknown_tool"
    PERMISSION_DENIED = "permission_denied"
    INVALID_ARGUMENTS = "invalid_arguments"
    CIRCUIT_OPEN = "circuit_open"
    INVALID_OUTPUT = "invalid_output"
    TOOL_ERROR = "tool_error"
    TOOL_TIMEOUT = "tool_timeout"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    DEPTH_EXCEEDED = "depth_exceeded"
    CYCLE_DETECTED = "cycle_detected"
    APPROVAL_REJECTED = "approval_rejected"
    # Errors that end a run.
    BUDGET_EXCEEDED = "budget_exceeded"
    MAX_STEPS = "max_steps_exceeded"
    MODEL_ERROR = "model_error"
    MALFORMED_MODEL_OUTPUT = "malformed_model_output"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    APPROVAL_EXPIRED = "approval_expired"
    INTERNAL_ERROR = "internal_error"
    LEASE_LOST = "lease_lost"
    CRASH_LOOP = "crash_loop"
    """The run crashed its workers ALPACA_MAX_RUN_ATTEMPTS times: quarantined, not requeued."""
    CONFIG_ERROR = "config_error"
    # A database or Redis the engine cannot use (faults.py): fix it, then resume.
    STORE_UNAVAILABLE = "store_unavailable"
    COORDINATION_UNAVAILABLE = "coordination_unavailable"
    # Text no store can keep, refused before anything is written (the API's 422 codes too).
    INVALID_UNICODE = "invalid_unicode"
    NUL_CHARACTER = "nul_character"


class AlpacaError(Exception):
    """An error with a stable code and a human message."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": str(self.code), "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class UnstorableText(AlpacaError, ValueError):
    """Text no store can keep: refused as it comes in, rather than changed or half-written."""


def unstorable_text(text: str) -> UnstorableText | None:
    """Why ``text`` cannot be stored, or None: a lone surrogate (``"\\ud800"`` in JSON, or
    undecodable bytes read with surrogateescape) is not Unicode, so not UTF-8 either;
    PostgreSQL text cannot hold U+0000, and a run must behave the same on every store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return UnstorableText(
            ErrorCode.INVALID_UNICODE, f"the text holds a lone UTF-16 surrogate at index "
            f"{exc.start} (not valid Unicode); send well-formed text", index=exc.start)
    if "\x00" in text:
        index = text.index("\x00")
        return UnstorableText(
            ErrorCode.NUL_CHARACTER, f"the text holds a NUL character (U+0000) at index "
            f"{index}, which the engine does not store; remove it", index=index)
    return None


class LeaseLost(AlpacaError):
    """The store refused a write because another worker now owns the run (stale epoch)."""

    def __init__(self, run_id: str, epoch: int) -> None:
        super().__init__(
            ErrorCode.LEASE_LOST, f"run {run_id}: lease lost (epoch {epoch} is stale)"
        )
        self.run_id = run_id
        self.epoch = epoch


class NotFound(Exception):
    """A run, approval or key that does not exist (or belongs to another tenant)."""


class TurnInProgress(Exception):
    """A thread's turns run one after the other: its last turn is not finished yet."""

    def __init__(self, thread_id: str, run_id: str, turn: int) -> None:
        super().__init__(f"turn {turn} of thread {thread_id} (run {run_id}) is still in "
                         "progress; send the next message once it has finished, or cancel it")
        self.thread_id = thread_id
        self.run_id = run_id
        self.turn = turn


class ApprovalConflict(Exception):
    """The approval was already decided (or expired): decisions are final."""


class Paused(Exception):
    """Raised through a step when the run must wait (an approval pending, a child running).

    Not a failure: telemetry ends the spans it crosses OK, with ``reason`` as the cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

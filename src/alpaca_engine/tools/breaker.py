"""Per-tool circuit breaker (DESIGN §6): pure state machine, time read from a ``Clock``.

``closed`` trips to ``open`` after ``failure_threshold`` consecutive failures or when the failure
rate over the last ``window_size`` calls reaches ``failure_rate_threshold`` (once at least
``minimum_calls`` are in the window). ``open`` fails fast for ``reset_timeout`` seconds; the next
``allow()`` after that moves to ``half_open``, which admits at most ``half_open_max_calls`` probes.
The breaker closes once that many probes have succeeded; any probe failure re-opens it and restarts
the timeout.

Probe slots: in ``half_open`` every ``allow()`` that returns True reserves one slot, and the caller
must settle it with ``record_success``, ``record_failure`` or ``release`` (call cancelled or its
outcome says nothing about the tool). Slots are not handed out again after a success, so one
half-open episode admits at most ``half_open_max_calls`` probes in total.

Results that arrive in ``open``, or in ``half_open`` with no probe outstanding, come from calls
admitted before the breaker tripped; they carry no news about recovery and are ignored.

The breaker keeps no I/O and no locks: it is meant to be driven from one event loop, and its state
is exported as a ``BreakerSnapshot`` so it can later live in shared storage. Transitions are queued
and handed out by ``drain_transitions()`` for audit and metrics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..clock import Clock


@dataclass(frozen=True)
class BreakerPolicy:
    """Thresholds for one tool; ``failure_rate_threshold=None`` disables the rate rule."""

    failure_threshold: int = 5
    failure_rate_threshold: float | None = 0.5
    window_size: int = 20
    minimum_calls: int = 10
    reset_timeout: float = 30.0
    half_open_max_calls: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.failure_rate_threshold is not None and not 0 < self.failure_rate_threshold <= 1:
            raise ValueError("failure_rate_threshold is a fraction in (0, 1] or None")
        if self.window_size < 1:
            raise ValueError("window_size must be >= 1")
        if not 1 <= self.minimum_calls <= self.window_size:
            # A minimum above the window size could never be reached: the rate rule would be dead.
            raise ValueError("minimum_calls must be between 1 and window_size")
        if self.reset_timeout < 0:
            raise ValueError("reset_timeout must be >= 0")
        if self.half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be >= 1")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class BreakerSnapshot:
    """Everything needed to rebuild a breaker; ``window`` holds True for success, oldest first."""

    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    window: list[bool] = field(default_factory=list)
    opened_at: float | None = None
    half_open_in_flight: int = 0
    half_open_successes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible form, for Redis or the journal."""
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "window": list(self.window),
            "opened_at": self.opened_at,
            "half_open_in_flight": self.half_open_in_flight,
            "half_open_successes": self.half_open_successes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreakerSnapshot:
        """Inverse of ``to_dict``; rejects inconsistent data rather than guessing."""
        opened_at = data.get("opened_at")
        snap = cls(
            state=BreakerState(data["state"]),
            consecutive_failures=int(data.get("consecutive_failures", 0)),
            window=[bool(x) for x in data.get("window", [])],
            opened_at=None if opened_at is None else float(opened_at),
            half_open_in_flight=int(data.get("half_open_in_flight", 0)),
            half_open_successes=int(data.get("half_open_successes", 0)),
        )
        if snap.consecutive_failures < 0 or snap.half_open_in_flight < 0:
            raise ValueError("counters must be >= 0")
        if snap.half_open_successes < 0:
            raise ValueError("counters must be >= 0")
        if snap.state is BreakerState.OPEN and snap.opened_at is None:
            raise ValueError("an open breaker needs opened_at")
        return snap


@dataclass(frozen=True)
class Transition:
    """One state change, kept for the audit log and breaker metrics."""

    tool: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str
    at: float


class CircuitBreaker:
    """Breaker for one tool; see the module docstring for the exact rules."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        clock: Clock,
        snapshot: BreakerSnapshot | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        snap = snapshot or BreakerSnapshot()
        if snap.state is BreakerState.OPEN and snap.opened_at is None:
            raise ValueError("an open breaker needs opened_at")
        self._state = snap.state
        self._consecutive_failures = snap.consecutive_failures
        # A snapshot taken under a larger window keeps only the most recent calls.
        self._window: deque[bool] = deque(snap.window, maxlen=policy.window_size)
        self._opened_at = snap.opened_at
        self._in_flight = snap.half_open_in_flight
        self._successes = snap.half_open_successes
        self._transitions: list[Transition] = []

    @property
    def state(self) -> BreakerState:
        """Stored state; an expired ``open`` only becomes ``half_open`` through ``allow()``."""
        return self._state

    def allow(self) -> bool:
        """Whether a call may proceed now; in ``half_open`` a True reserves a probe slot."""
        if self._state is BreakerState.OPEN:
            if self._open_elapsed() < self.policy.reset_timeout:
                return False
            self._in_flight = 0
            self._successes = 0
            self._move(BreakerState.HALF_OPEN, "reset timeout elapsed")
        if self._state is BreakerState.HALF_OPEN:
            if self._in_flight + self._successes >= self.policy.half_open_max_calls:
                return False
            self._in_flight += 1
        return True

    def record_success(self) -> None:
        """Count a successful call; in ``half_open`` it settles one probe."""
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            self._window.append(True)
        elif self._state is BreakerState.HALF_OPEN and self._in_flight > 0:
            self._in_flight -= 1
            self._successes += 1
            if self._successes >= self.policy.half_open_max_calls:
                self._close()

    def record_failure(self) -> None:
        """Count a failed call; may trip a closed breaker or re-open a half-open one."""
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures += 1
            self._window.append(False)
            reason = self._trip_reason()
            if reason is not None:
                self._open(reason)
        elif self._state is BreakerState.HALF_OPEN and self._in_flight > 0:
            self._open("probe failed")

    def release(self) -> None:
        """Give back a probe slot whose call ended without a verdict on the tool's health."""
        if self._state is BreakerState.HALF_OPEN and self._in_flight > 0:
            self._in_flight -= 1

    def retry_after(self) -> float | None:
        """Seconds until ``allow()`` would admit a probe, while open; None in other states."""
        if self._state is not BreakerState.OPEN:
            return None
        return max(0.0, self.policy.reset_timeout - self._open_elapsed())

    def snapshot(self) -> BreakerSnapshot:
        return BreakerSnapshot(
            state=self._state,
            consecutive_failures=self._consecutive_failures,
            window=list(self._window),
            opened_at=self._opened_at,
            half_open_in_flight=self._in_flight,
            half_open_successes=self._successes,
        )

    def drain_transitions(self) -> list[Transition]:
        """Transitions since the previous drain, oldest first."""
        out, self._transitions = self._transitions, []
        return out

    # -- internals ---------------------------------------------------------------------------

    def _open_elapsed(self) -> float:
        # Compare elapsed time with the timeout rather than ``opened_at + timeout`` with now:
        # adding a small timeout to a large timestamp can round it away.
        assert self._opened_at is not None
        return self._clock.now() - self._opened_at

    def _trip_reason(self) -> str | None:
        policy = self.policy
        if self._consecutive_failures >= policy.failure_threshold:
            return f"{self._consecutive_failures} consecutive failures"
        calls = len(self._window)
        if policy.failure_rate_threshold is None or calls < policy.minimum_calls:
            return None
        rate = self._window.count(False) / calls
        if rate >= policy.failure_rate_threshold:
            return f"failure rate {rate:.2f} over {calls} calls"
        return None

    def _open(self, reason: str) -> None:
        self._opened_at = self._clock.now()
        self._in_flight = 0
        self._successes = 0
        self._move(BreakerState.OPEN, reason)

    def _close(self) -> None:
        # Start the closed period from a clean slate: old failures must not re-trip at once.
        self._consecutive_failures = 0
        self._window.clear()
        self._opened_at = None
        self._in_flight = 0
        self._successes = 0
        self._move(BreakerState.CLOSED, "probe succeeded")

    def _move(self, to_state: BreakerState, reason: str) -> None:
        self._transitions.append(
            Transition(self.name, self._state, to_state, reason, self._clock.now())
        )
        self._state = to_state

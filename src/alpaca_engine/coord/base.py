"""The coordination protocol (DESIGN §8): breaker state, event fan-out and dispatch.

In-process for the embedded default (one process), Redis for many workers and API
replicas. Correctness never depends on it: leases and fencing in the store are what make
runs exactly-owned; coordination only shares state and delivers work faster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from ..tools.breaker import BreakerPolicy, BreakerSnapshot, Transition

Outcome = Literal["success", "failure", "release"]


class BreakerBoard(Protocol):
    """Circuit breakers by tool name, shared by every worker that uses the same board."""

    async def allow(
        self, tool: str, policy: BreakerPolicy
    ) -> tuple[bool, float | None, list[Transition]]:
        """May a call go through now? Returns (allowed, retry_after, transitions)."""

    async def record(self, tool: str, policy: BreakerPolicy, outcome: Outcome) -> list[Transition]:
        """Report the outcome of an admitted call."""

    async def snapshots(self) -> dict[str, BreakerSnapshot]:
        """Current state of every breaker seen (for ``alpaca tools list`` and /v1/breakers)."""


class EventBus(Protocol):
    """Fan-out of 'something happened to run X' so SSE streams on any replica wake up."""

    async def publish(self, run_id: str, event: dict[str, Any]) -> None: ...

    def subscribe(self, run_id: str, *, tree: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Events of ``run_id`` (``"*"``: of every run); with ``tree``, of its descendants
        too (ids ``run_id.…``): what a tree's SSE stream or a chat turn listens to, without
        receiving every other run's events to drop them."""
        ...


class Dispatcher(Protocol):
    """Delivers run ids to workers; at-least-once (the store's lease decides ownership)."""

    async def dispatch(self, run_id: str) -> None: ...

    async def next(self, consumer: str, block_seconds: float) -> tuple[str, str] | None:
        """(delivery id, run id), or None on timeout."""

    async def ack(self, delivery_id: str) -> None: ...

    async def reclaim(self, consumer: str, min_idle_seconds: float) -> list[tuple[str, str]]:
        """Take over deliveries a dead consumer never acknowledged."""

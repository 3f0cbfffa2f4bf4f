"""In-process coordination: the embedded default for one process."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from ..clock import Clock, SystemClock
from ..tools.breaker import BreakerPolicy, BreakerSnapshot, CircuitBreaker, Transition
from .base import Outcome


class LocalBreakerBoard:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._breakers: dict[str, CircuitBreaker] = {}

    def _get(self, tool: str, policy: BreakerPolicy) -> CircuitBreaker:
        breaker = self._breakers.get(tool)
        if breaker is None:
            breaker = self._breakers[tool] = CircuitBreaker(tool, policy, self._clock)
        return breaker

    async def allow(
        self, tool: str, policy: BreakerPolicy
    ) -> tuple[bool, float | None, list[Transition]]:
        breaker = self._get(tool, policy)
        allowed = breaker.allow()
        return allowed, breaker.retry_after(), breaker.drain_transitions()

    async def record(self, tool: str, policy: BreakerPolicy, outcome: Outcome) -> list[Transition]:
        breaker = self._get(tool, policy)
        if outcome == "success":
            breaker.record_success()
        elif outcome == "failure":
            breaker.record_failure()
        else:
            breaker.release()
        return breaker.drain_transitions()

    async def snapshots(self) -> dict[str, BreakerSnapshot]:
        return {name: b.snapshot() for name, b in self._breakers.items()}


class LocalEventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._trees: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)

    async def publish(self, run_id: str, event: dict[str, Any]) -> None:
        queues = [*self._subscribers.get(run_id, ()), *self._subscribers.get("*", ())]
        if self._trees:  # the run's own tree and each ancestor's: "a", "a.1" for "a.1.2"
            at = run_id.find(".")
            while at != -1:
                queues += self._trees.get(run_id[:at], ())
                at = run_id.find(".", at + 1)
            queues += self._trees.get(run_id, ())
        for queue in queues:
            queue.put_nowait(event)

    async def subscribe(self, run_id: str, *,
                        tree: bool = False) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        table = self._trees if tree and run_id != "*" else self._subscribers
        table[run_id].add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            table[run_id].discard(queue)
            if not table[run_id]:
                del table[run_id]

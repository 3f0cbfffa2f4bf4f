"""Progress events on their way to the event bus: in order, never holding up a run.

The runner emits synchronously (a progress display must never slow or break a run), and
a streaming model emits one event per delta. The outbox keeps them in a bounded buffer
that one task drains, in emission order (so a client sees a message's deltas in order,
whichever Redis connection the pool hands out), batching what piled up while the bus was
slow. When the buffer is full, newer events are **dropped** and counted: for a delta the
client sees a gap in ``index``, for any other event only an SSE wake-up is lost (streams
re-read the store every half second anyway). The durable record never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from .base import EventBus

log = logging.getLogger("alpaca.coord.outbox")

DEFAULT_LIMIT = 10_000
"""Events buffered per process before newer ones are dropped (a few MB of deltas)."""
BATCH = 256
"""Most events one bus round trip carries."""


class Outbox:
    def __init__(self, bus: EventBus, limit: int = DEFAULT_LIMIT) -> None:
        self._bus = bus
        self._limit = limit
        self._queue: deque[dict[str, Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        """Events refused because the buffer was full (since this outbox was made)."""

    def put(self, event: dict[str, Any]) -> None:
        """Queue ``event`` (it has a ``run_id``); never blocks, never raises."""
        if len(self._queue) >= self._limit:
            if self.dropped % 1000 == 0:
                log.warning("event bus too slow: %d progress events dropped so far "
                            "(a stream shows a gap; durable records are unaffected)",
                            self.dropped + 1)
            self.dropped += 1
            return
        self._queue.append(event)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def flush(self) -> None:
        """Wait until everything queued so far went to the bus (or failed to)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        many = getattr(self._bus, "publish_many", None)
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            try:
                if many is not None:
                    await many(batch)
                else:
                    for event in batch:
                        await self._bus.publish(str(event["run_id"]), event)
            except Exception:
                log.debug("event bus publish failed", exc_info=True)

"""Pick the coordination implementation: in-process without a Redis URL, Redis with one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..clock import Clock
from ..faults import DEFAULT_CONNECT_TIMEOUT, CoordinationUnavailable, Fault, coordination_fault
from .base import BreakerBoard, Dispatcher, EventBus
from .local import LocalBreakerBoard, LocalEventBus


@dataclass
class Coordination:
    """Everything processes share; ``dispatcher`` is None when workers only poll the store."""

    breakers: BreakerBoard
    events: EventBus
    dispatcher: Dispatcher | None
    close: Callable[[], Awaitable[None]]
    check: Callable[[], Awaitable[None]] = field(default=lambda: _nothing())
    """Raise :class:`~alpaca_engine.faults.CoordinationUnavailable` unless Redis answers
    (within the connect timeout): commands call it first, so they fail in one line."""


async def _nothing() -> None:
    return None


_nothing_to_close = _nothing


def make_coordination(
    redis_url: str | None, clock: Clock | None = None, *, prefix: str = "alpaca:",
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Coordination:
    """Local coordination for one process, or Redis (one client shared by all three parts).

    ``prefix`` namespaces every key, channel and the stream, so several deployments (or test
    runs) can share one Redis. ``connect_timeout`` bounds each connection attempt.
    """
    if not redis_url:
        return Coordination(
            breakers=LocalBreakerBoard(clock),
            events=LocalEventBus(),
            dispatcher=None,
            close=_nothing_to_close,
        )
    import redis.asyncio as aioredis  # lazy: embedded users never load the client

    from .redis import RedisBreakerBoard, RedisDispatcher, RedisEventBus

    url = redis_url
    try:
        client = aioredis.from_url(url, socket_connect_timeout=connect_timeout)
    except ValueError as exc:
        raise CoordinationUnavailable(
            url, Fault.MALFORMED_URL, f"not a Redis URL ({exc})",
            "Set ALPACA_REDIS_URL to redis://host:6379/0 (or unset it to run in one "
            "process)") from None

    async def close() -> None:
        await client.aclose()

    async def check() -> None:
        try:
            await asyncio.wait_for(client.ping(), connect_timeout)
        except Exception as exc:
            fault = coordination_fault(exc, url, connect_timeout)
            if fault is None:
                raise
            raise fault from exc

    return Coordination(
        breakers=RedisBreakerBoard(client, prefix=prefix, clock=clock),
        events=RedisEventBus(client, prefix),
        dispatcher=RedisDispatcher(client, stream=f"{prefix}runs"),
        close=close,
        check=check,
    )

"""Pick the coordination implementation: in-process without a Redis URL, Redis with one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..clock import Clock
from .base import BreakerBoard, Dispatcher, EventBus
from .local import LocalBreakerBoard, LocalEventBus


@dataclass
class Coordination:
    """Everything processes share; ``dispatcher`` is None when workers only poll the store."""

    breakers: BreakerBoard
    events: EventBus
    dispatcher: Dispatcher | None
    close: Callable[[], Awaitable[None]]


async def _nothing_to_close() -> None:
    return None


def make_coordination(
    redis_url: str | None, clock: Clock | None = None, *, prefix: str = "alpaca:"
) -> Coordination:
    """Local coordination for one process, or Redis (one client shared by all three parts).

    ``prefix`` namespaces every key, channel and the stream, so several deployments (or test
    runs) can share one Redis.
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

    client = aioredis.from_url(redis_url)

    async def close() -> None:
        await client.aclose()

    return Coordination(
        breakers=RedisBreakerBoard(client, prefix=prefix, clock=clock),
        events=RedisEventBus(client, prefix),
        dispatcher=RedisDispatcher(client, stream=f"{prefix}runs"),
        close=close,
    )

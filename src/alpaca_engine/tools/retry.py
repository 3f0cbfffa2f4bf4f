"""Retry policies (DESIGN §6): attempts, exponential backoff with jitter, per-attempt timeout.

Only transient errors are retried; contract and permission errors never are. The caller gets a
callback per failed attempt so that each attempt is journaled and audited.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ..clock import Clock, SystemClock

T = TypeVar("T")


class TransientError(Exception):
    """Raise from a tool to mark a failure worth retrying (a flaky upstream, a 503)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 1
    initial_delay: float = 0.2
    multiplier: float = 2.0
    max_delay: float = 10.0
    jitter: float = 0.1
    attempt_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 (the first try counts)")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction between 0 and 1")

    def delay(self, failed_attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Delay before the attempt after ``failed_attempt`` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (failed_attempt - 1))
        return max(0.0, base * (1 + self.jitter * (2 * rand() - 1)))


NO_RETRY = RetryPolicy()


def default_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, TransientError | TimeoutError | ConnectionError):
        return True
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status == 429 or status >= 500
    return bool(getattr(exc, "transient", False))


OnRetry = Callable[[int, BaseException, float], Awaitable[None]]


def _retryable(attempt: int, exc: BaseException, policy: RetryPolicy,
               is_transient: Callable[[BaseException], bool]) -> bool:
    return attempt < policy.max_attempts and is_transient(exc)


async def _back_off(attempt: int, exc: BaseException, policy: RetryPolicy, clock: Clock,
                    on_retry: OnRetry | None, rand: Callable[[], float]) -> None:
    """The pause between attempts, announced first (``on_retry`` journals it)."""
    delay = policy.delay(attempt, rand)
    if on_retry is not None:
        await on_retry(attempt, exc, delay)
    await clock.sleep(delay)


async def call_with_retry(
    fn: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    is_transient: Callable[[BaseException], bool] = default_is_transient,
    clock: Clock | None = None,
    on_retry: OnRetry | None = None,
    rand: Callable[[], float] = random.random,
) -> T:
    """Call ``fn(attempt)`` until it succeeds, a permanent error occurs, or attempts run out."""
    clock = clock or SystemClock()
    attempt = 1
    while True:
        try:
            if policy.attempt_timeout is not None:
                return await asyncio.wait_for(fn(attempt), policy.attempt_timeout)
            return await fn(attempt)
        except Exception as exc:
            if not _retryable(attempt, exc, policy, is_transient):
                raise
            await _back_off(attempt, exc, policy, clock, on_retry, rand)
            attempt += 1


async def stream_with_retry(
    open_stream: Callable[[int], AsyncIterator[T]],
    policy: RetryPolicy,
    *,
    is_transient: Callable[[BaseException], bool] = default_is_transient,
    clock: Clock | None = None,
    on_retry: OnRetry | None = None,
    rand: Callable[[], float] = random.random,
) -> AsyncIterator[T]:
    """:func:`call_with_retry` for a stream: each attempt's items pass through as they come;
    a transient failure part-way (a connection cut) starts the next attempt from the
    beginning, after ``on_retry`` (which is how a consumer knows to discard what it got).
    ``attempt_timeout`` bounds each whole attempt."""
    clock = clock or SystemClock()
    loop = asyncio.get_running_loop()
    attempt = 1
    while True:
        stream = open_stream(attempt)
        deadline = (loop.time() + policy.attempt_timeout
                    if policy.attempt_timeout is not None else None)
        failure: Exception | None = None
        try:
            while True:
                try:
                    if deadline is None:
                        item = await anext(stream)
                    else:
                        item = await asyncio.wait_for(anext(stream),
                                                      max(0.0, deadline - loop.time()))
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    if not _retryable(attempt, exc, policy, is_transient):
                        raise
                    failure = exc
                    break
                yield item  # outside the try: the consumer's own errors are never retried
        finally:
            closing = getattr(stream, "aclose", None)
            if closing is not None:
                await closing()
        assert failure is not None  # the inner loop only breaks on a retryable failure
        await _back_off(attempt, failure, policy, clock, on_retry, rand)
        attempt += 1

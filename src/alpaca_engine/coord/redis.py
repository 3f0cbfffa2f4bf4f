"""Redis coordination (DESIGN §8): shared breakers, cross-replica events, Streams dispatch.

Redis only shares state and delivers work faster; it is never the source of truth. The store's
lease + fencing decide who owns a run, so the dispatcher may deliver a run twice, or lose it
(Redis restarted without persistence, stream trimmed): workers keep polling the store for queued
runs, so a lost delivery only costs latency. That is why the dispatcher retries connection
trouble briefly and then degrades (logs, returns None / []) instead of failing the caller.

Breaker state is stored as ``BreakerSnapshot.to_dict()`` JSON and updated with optimistic locking
(WATCH/MULTI), so concurrent workers never lose an update or share one half-open probe slot.
Timestamps in a snapshot come from each worker's ``clock``: worker clocks must be roughly in sync
(NTP), a skew shortens or lengthens the open period by that much.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    ResponseError,
    TimeoutError,
    WatchError,
)

from ..clock import Clock, SystemClock
from ..tools.breaker import BreakerPolicy, BreakerSnapshot, CircuitBreaker, Transition
from .base import Outcome

log = logging.getLogger("alpaca.coord.redis")

T = TypeVar("T")


def _text(value: bytes | str) -> str:
    """Clients may or may not use ``decode_responses``; accept both."""
    return value.decode() if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    """Escape a literal prefix for SCAN MATCH / PSUBSCRIBE-style glob patterns."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class BreakerContention(RuntimeError):
    """Too many concurrent writers on one breaker key; the caller may retry the tool call."""


class RedisBreakerBoard:
    """Circuit breakers whose state lives in Redis, so every worker sees the same breaker."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "alpaca:",
        clock: Clock | None = None,
        max_attempts: int = 200,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock or SystemClock()
        self._max_attempts = max_attempts

    def _key(self, tool: str) -> str:
        return f"{self._prefix}breaker:{tool}"

    def _load(self, tool: str, raw: bytes | str | None) -> BreakerSnapshot | None:
        if raw is None:
            return None
        try:
            return BreakerSnapshot.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            # A breaker is protection, not truth: a damaged entry restarts closed, loudly.
            log.warning("breaker %s: discarding unreadable state %r (%s)", tool, raw, exc)
            return None

    async def _update(
        self, tool: str, policy: BreakerPolicy, op: Callable[[CircuitBreaker], T]
    ) -> tuple[T, CircuitBreaker, list[Transition]]:
        """Read-modify-write one breaker under WATCH; retried until no other writer interfered."""
        key = self._key(tool)
        for attempt in range(self._max_attempts):
            async with self._client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw: bytes | str | None = await pipe.get(key)
                    snapshot = self._load(tool, raw)
                    breaker = CircuitBreaker(tool, policy, self._clock, snapshot)
                    before = breaker.snapshot().to_dict()
                    result = op(breaker)
                    transitions = breaker.drain_transitions()
                    after = breaker.snapshot().to_dict()
                    if after == before and not transitions and snapshot is not None:
                        # Nothing changed (the common closed-breaker allow): skip the write.
                        # (unwatch/multi/aclose are unannotated in redis-py, hence the ignores.)
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return result, breaker, transitions
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, json.dumps(after, separators=(",", ":")))
                    await pipe.execute()
                    return result, breaker, transitions
                except WatchError:
                    # Another worker changed the breaker in between: start over from its state.
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(attempt, 6))))
        raise BreakerContention(f"breaker {tool!r}: gave up after {self._max_attempts} conflicts")

    async def allow(
        self, tool: str, policy: BreakerPolicy
    ) -> tuple[bool, float | None, list[Transition]]:
        allowed, breaker, transitions = await self._update(tool, policy, CircuitBreaker.allow)
        return allowed, breaker.retry_after(), transitions

    async def record(self, tool: str, policy: BreakerPolicy, outcome: Outcome) -> list[Transition]:
        def apply(breaker: CircuitBreaker) -> None:
            if outcome == "success":
                breaker.record_success()
            elif outcome == "failure":
                breaker.record_failure()
            else:
                breaker.release()

        _, _, transitions = await self._update(tool, policy, apply)
        return transitions

    async def snapshots(self) -> dict[str, BreakerSnapshot]:
        head = f"{self._prefix}breaker:"
        keys = [
            _text(k)
            async for k in self._client.scan_iter(match=_glob_escape(head) + "*", count=500)
        ]
        if not keys:
            return {}
        values: list[bytes | str | None] = await self._client.mget(keys)
        out: dict[str, BreakerSnapshot] = {}
        for key, raw in zip(keys, values, strict=True):
            tool = key[len(head) :]
            snapshot = self._load(tool, raw)
            if snapshot is not None:
                out[tool] = snapshot
        return dict(sorted(out.items()))


class RedisEventBus:
    """Run events over Redis pub/sub, so an SSE stream on any replica sees every worker's events.

    Each event is published once, on ``{prefix}events:{run_id}``. A subscriber to one run
    subscribes to that channel; to a run tree, also to the pattern
    ``{prefix}events:{run_id}.*`` (its descendants); to ``"*"``, to ``{prefix}events:*``. So a
    tree's stream receives its tree's events only, and a worker sends one command per event
    (it used to send a second copy to an every-run channel, which each tree stream then
    filtered). Pub/sub is fire-and-forget: events published while a subscriber is
    disconnected are lost, which is fine: most only wake readers of the store, and the
    ephemeral ``message.delta`` ones are never replayed anyway (the completed turn is a
    durable record). The Engine publishes through an ``Outbox`` (ordered, batched with
    :meth:`publish_many`, bounded), so a slow Redis never holds up a run.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "alpaca:") -> None:
        self._client = client
        self._prefix = prefix

    def channel(self, run_id: str) -> str:
        """The channel ``run_id``'s events are published on."""
        return f"{self._prefix}events:{run_id}"

    def topics(self, run_id: str, *, tree: bool = False) -> tuple[list[str], list[str]]:
        """What a subscriber to ``run_id`` (``"*"``: every run) listens to: channels and
        patterns."""
        if run_id == "*":
            return [], [_glob_escape(f"{self._prefix}events:") + "*"]
        channel = self.channel(run_id)
        patterns = [_glob_escape(channel) + ".*"] if tree else []
        return [channel], patterns

    async def publish(self, run_id: str, event: dict[str, Any]) -> None:
        await self._client.publish(self.channel(run_id), _encoded(event))

    async def publish_many(self, events: list[dict[str, Any]]) -> None:
        """Several events (each with its ``run_id``) in one round trip, in order."""
        async with self._client.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.publish(self.channel(str(event["run_id"])), _encoded(event))
            await pipe.execute()

    async def subscribe(self, run_id: str, *,
                        tree: bool = False) -> AsyncGenerator[dict[str, Any], None]:
        """Events of ``run_id`` (with ``tree``, of its descendants too) until the consumer
        stops.

        Python 3.11's ``asyncio.wait_for`` (which redis-py uses for socket writes) swallows a
        cancellation that lands just as the write completes; a subscriber cancelled then would
        block on ``get_message`` forever (and hold the SSE response that owns it open). So the
        read is bounded and a swallowed cancellation is re-raised at each turn of the loop.
        """
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        delay = 0.05
        try:
            channels, patterns = self.topics(run_id, tree=tree)
            if channels:
                await pubsub.subscribe(*channels)
            if patterns:
                await pubsub.psubscribe(*patterns)
            while True:
                _raise_if_cancelling()
                try:
                    message = await pubsub.get_message(timeout=_READ_SECONDS)
                except (AuthenticationError, AuthorizationError):
                    raise
                except (ConnectionError, TimeoutError) as exc:
                    # redis-py reconnects and re-subscribes on the next read; just pace it.
                    log.warning("event subscription %s: %s; retrying", run_id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                delay = 0.05
                if message is None or message.get("type") not in _DELIVERIES:
                    continue
                try:
                    event = json.loads(message["data"])
                except ValueError:
                    log.warning("event subscription %s: dropping non-JSON message", run_id)
                    continue
                if isinstance(event, dict):
                    yield event
        finally:
            # Closing drops the connection, which also ends the subscription server-side.
            await pubsub.aclose()  # type: ignore[no-untyped-call]


def _encoded(event: dict[str, Any]) -> str:
    """An event as it travels: compact JSON (what :meth:`RedisEventBus.subscribe` decodes)."""
    return json.dumps(event, separators=(",", ":"), default=str)


_DELIVERIES = ("message", "pmessage")
"""A published message, received through a channel or a pattern subscription."""

_READ_SECONDS = 1.0
"""How long one pub/sub read blocks before the subscriber checks it was not cancelled."""


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that a library call swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Unavailable(Exception):
    """Redis stayed unreachable for the whole retry budget of one dispatcher call."""


def _recoverable(exc: BaseException) -> bool:
    """Errors a Redis restart or a lost stream produces; anything else is a real bug/config."""
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, BusyLoadingError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("NOGROUP", "LOADING"))


class RedisDispatcher:
    """Run ids delivered to workers through a Redis Streams consumer group (at least once).

    ``next`` reads new entries, ``ack`` settles them (and deletes them, so the stream only holds
    work in flight), ``reclaim`` takes over entries of a consumer that died before acking.
    The group is created lazily with MKSTREAM and recreated whenever Redis reports it missing
    (NOGROUP after a restart without persistence, or the key was deleted). Entries lost that way
    are not recovered here: workers also poll the store for queued runs.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream: str = "alpaca:runs",
        group: str = "workers",
        maxlen: int = 100_000,
        delete_on_ack: bool = True,
        attempts: int = 5,
        backoff: float = 0.05,
        max_backoff: float = 1.0,
    ) -> None:
        self._client = client
        self.stream = stream
        self.group = group
        self._maxlen = maxlen
        self._delete_on_ack = delete_on_ack
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._group_ready = False

    async def _ensure_group(self) -> None:
        try:
            # id=0: entries dispatched before the group existed are delivered too.
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        self._group_ready = True

    async def _call(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        *,
        needs_group: bool,
        deadline: float | None = None,
    ) -> T:
        """Run ``fn``, recreating the group and backing off on recoverable errors.

        Gives up with ``_Unavailable`` after ``attempts`` tries or, when a ``deadline`` (loop
        time) is given, once it has passed: ``next`` keeps trying for its whole block budget.
        """
        loop = asyncio.get_running_loop()
        delay = self._backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                if needs_group and not self._group_ready:
                    await self._ensure_group()
                return await fn()
            except Exception as exc:
                if not _recoverable(exc):
                    raise
                self._group_ready = False
                if attempt == 1 and isinstance(exc, ResponseError):
                    continue  # NOGROUP: stream/group vanished; recreate it at once, no wait
                if deadline is None:
                    if attempt >= self._attempts:
                        raise _Unavailable(f"{what}: {exc}") from exc
                    pause = delay
                else:
                    pause = min(delay, deadline - loop.time())
                    if pause <= 0:
                        raise _Unavailable(f"{what}: {exc}") from exc
                log.debug("dispatcher %s: %s; retrying in %.2fs", what, exc, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, self._max_backoff)

    async def dispatch(self, run_id: str) -> None:
        """Announce a queued run; if Redis is down the run is still found by store polling."""

        async def add() -> None:
            await self._client.xadd(
                self.stream, {"run_id": run_id}, maxlen=self._maxlen, approximate=True
            )

        try:
            await self._call("dispatch", add, needs_group=False)
        except _Unavailable as exc:
            log.warning(
                "run %s not dispatched (%s); workers will find it in the store", run_id, exc
            )

    async def next(self, consumer: str, block_seconds: float) -> tuple[str, str] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, block_seconds)

        async def read() -> list[tuple[str, dict[Any, Any] | None]]:
            remaining = deadline - loop.time()
            # BLOCK 0 would wait forever; a spent budget means one non-blocking read.
            block = max(1, int(remaining * 1000)) if remaining > 0 else None
            response = await self._client.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=1, block=block
            )
            return _stream_entries(response)

        while True:
            try:
                entries = await self._call("next", read, needs_group=True, deadline=deadline)
            except _Unavailable as exc:
                log.warning("dispatcher unavailable for %s: %s", consumer, exc)
                return None
            for entry_id, fields in entries:
                run_id = _run_id(fields)
                if run_id is not None:
                    return entry_id, run_id
                await self.ack(entry_id)  # an entry without a run id is junk: settle it
            if not entries or loop.time() >= deadline:
                return None

    async def ack(self, delivery_id: str) -> None:
        """Settle a delivery; a failed ack only means the entry may be reclaimed later."""

        async def settle() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.xack(self.stream, self.group, delivery_id)
                if self._delete_on_ack:
                    pipe.xdel(self.stream, delivery_id)
                await pipe.execute()

        try:
            await self._call("ack", settle, needs_group=False)
        except _Unavailable as exc:
            log.warning("could not ack %s: %s", delivery_id, exc)

    async def reclaim(self, consumer: str, min_idle_seconds: float) -> list[tuple[str, str]]:
        """Claim every entry idle for ``min_idle_seconds`` (its consumer presumably died)."""
        min_idle = max(0, int(min_idle_seconds * 1000))
        # Keyed by entry id: a retried sweep must not forget entries the failed one already
        # claimed (their idle time is reset, so a second XAUTOCLAIM would not return them).
        claimed: dict[str, str] = {}

        async def sweep() -> None:
            cursor = "0-0"
            while True:
                response = await self._client.xautoclaim(
                    self.stream, self.group, consumer, min_idle, start_id=cursor, count=100
                )
                cursor = _text(response[0])
                for entry_id, fields in _entry_list(response[1]):
                    run_id = _run_id(fields)
                    if run_id is None:
                        await self.ack(entry_id)  # deleted or junk entry: settle it
                    else:
                        claimed[entry_id] = run_id
                if cursor == "0-0":
                    return

        try:
            await self._call("reclaim", sweep, needs_group=True)
        except _Unavailable as exc:
            log.warning("could not reclaim for %s: %s", consumer, exc)
            return []
        return list(claimed.items())


def _entry_list(raw: Any) -> list[tuple[str, dict[Any, Any] | None]]:
    # redis-py reports an entry deleted while pending as (None, None): nothing to deliver.
    return [(_text(entry_id), fields) for entry_id, fields in raw or () if entry_id is not None]


def _stream_entries(response: Any) -> list[tuple[str, dict[Any, Any] | None]]:
    """Entries of an XREADGROUP reply, RESP2 (list of pairs) or RESP3 (dict) alike."""
    if not response:
        return []
    if isinstance(response, dict):
        out: list[tuple[str, dict[Any, Any] | None]] = []
        for batches in response.values():
            for batch in batches:
                out += _entry_list(batch)
        return out
    return [entry for _stream, raw in response for entry in _entry_list(raw)]


def _run_id(fields: dict[Any, Any] | None) -> str | None:
    if not fields:
        return None
    value = fields.get(b"run_id", fields.get("run_id"))
    return None if value is None else _text(value)

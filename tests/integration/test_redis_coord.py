"""Redis coordination: breakers shared across workers, cross-client events, Streams dispatch.

Every test uses its own random key prefix / stream (deleted afterwards) and its own clients, each
standing in for a separate worker process, so tests can run in parallel against one server.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from alpaca_engine.clock import FakeClock
from alpaca_engine.coord.factory import make_coordination
from alpaca_engine.coord.local import LocalBreakerBoard, LocalEventBus
from alpaca_engine.coord.outbox import Outbox
from alpaca_engine.coord.redis import RedisBreakerBoard, RedisDispatcher, RedisEventBus
from alpaca_engine.tools.breaker import BreakerPolicy, BreakerState, Transition
from tests.conftest import service_unavailable
from tests.helpers import PATIENCE

pytestmark = pytest.mark.redis

REDIS_URL = os.environ.get("ALPACA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

Connect = Callable[..., aioredis.Redis]


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A fresh key namespace; every key under it is deleted after the test."""
    name = f"alpaca-test-{uuid.uuid4().hex[:12]}:"
    admin = aioredis.from_url(REDIS_URL, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
    try:
        await admin.ping()
    except (RedisConnectionError, OSError) as exc:
        await admin.aclose()
        service_unavailable("Redis", str(exc))
    try:
        yield name
    finally:
        keys = [k async for k in admin.scan_iter(match=_escape(name) + "*", count=1000)]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


@pytest.fixture
async def connect(prefix: str) -> AsyncIterator[Connect]:
    """Opens separate clients (one per simulated worker) and closes them all afterwards."""
    clients: list[aioredis.Redis] = []

    def open_client(url: str = REDIS_URL, **kwargs: Any) -> aioredis.Redis:
        client = aioredis.from_url(url, **kwargs)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.aclose()


def _moves(transitions: list[Transition]) -> list[tuple[str, str]]:
    return [(t.from_state.value, t.to_state.value) for t in transitions]


# -- breakers ---------------------------------------------------------------------------------

POLICY = BreakerPolicy(failure_threshold=3, failure_rate_threshold=None, reset_timeout=10.0)


async def test_failures_on_one_board_open_the_breaker_for_another(
    connect: Connect, prefix: str
) -> None:
    clock = FakeClock()
    a = RedisBreakerBoard(connect(), prefix=prefix, clock=clock)
    b = RedisBreakerBoard(connect(), prefix=prefix, clock=clock)

    assert await b.allow("search", POLICY) == (True, None, [])
    for _ in range(2):
        assert await a.record("search", POLICY, "failure") == []
    assert _moves(await a.record("search", POLICY, "failure")) == [("closed", "open")]

    allowed, retry_after, moves = await b.allow("search", POLICY)
    assert (allowed, retry_after, moves) == (False, 10.0, [])
    snaps = await b.snapshots()
    assert snaps["search"].state is BreakerState.OPEN
    assert snaps["search"].opened_at == clock.now()

    clock.advance(10.0)
    allowed, _, moves = await b.allow("search", POLICY)
    assert allowed and _moves(moves) == [("open", "half_open")]
    assert _moves(await a.record("search", POLICY, "success")) == [("half_open", "closed")]
    assert (await a.snapshots())["search"].state is BreakerState.CLOSED


async def test_only_one_of_twenty_concurrent_callers_gets_the_half_open_probe(
    connect: Connect, prefix: str
) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=1, failure_rate_threshold=None, reset_timeout=5.0)
    boards = [RedisBreakerBoard(connect(), prefix=prefix, clock=clock) for _ in range(4)]
    await boards[0].record("mail", policy, "failure")
    clock.advance(5.0)

    results = await asyncio.gather(*(boards[i % 4].allow("mail", policy) for i in range(20)))

    assert sum(allowed for allowed, _, _ in results) == 1
    moves = [m for _, _, transitions in results for m in _moves(transitions)]
    assert moves == [("open", "half_open")]  # announced once, by exactly one caller
    snap = (await boards[3].snapshots())["mail"]
    assert snap.state is BreakerState.HALF_OPEN and snap.half_open_in_flight == 1

    # The probe fails: re-opened once, and nobody else gets in until the timeout passes again.
    winner = next(i for i, (allowed, _, _) in enumerate(results) if allowed)
    reopen = await boards[winner % 4].record("mail", policy, "failure")
    assert _moves(reopen) == [("half_open", "open")]
    assert (await boards[1].allow("mail", policy))[0] is False


async def test_concurrent_failures_trip_the_breaker_exactly_once(
    connect: Connect, prefix: str
) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=5, failure_rate_threshold=None)
    boards = [RedisBreakerBoard(connect(), prefix=prefix, clock=clock) for _ in range(4)]

    results = await asyncio.gather(
        *(boards[i % 4].record("db", policy, "failure") for i in range(20))
    )

    assert [m for transitions in results for m in _moves(transitions)] == [("closed", "open")]
    snap = (await boards[0].snapshots())["db"]
    # No lost update: exactly the first five failures counted before the trip.
    assert snap.state is BreakerState.OPEN and snap.consecutive_failures == 5


async def test_release_gives_the_probe_slot_back(connect: Connect, prefix: str) -> None:
    clock = FakeClock()
    policy = BreakerPolicy(failure_threshold=1, failure_rate_threshold=None, reset_timeout=1.0)
    a = RedisBreakerBoard(connect(), prefix=prefix, clock=clock)
    b = RedisBreakerBoard(connect(), prefix=prefix, clock=clock)
    await a.record("t", policy, "failure")
    clock.advance(1.0)
    assert (await a.allow("t", policy))[0] is True
    assert (await b.allow("t", policy))[0] is False
    assert await a.record("t", policy, "release") == []
    assert (await b.allow("t", policy))[0] is True


async def test_snapshots_list_only_this_prefix_and_survive_damaged_entries(
    connect: Connect, prefix: str
) -> None:
    client = connect()
    board = RedisBreakerBoard(client, prefix=prefix)
    # A sibling namespace whose name is a glob matching ours must not leak into the listing.
    other = RedisBreakerBoard(client, prefix=prefix + "[x]*:")
    assert await board.snapshots() == {}
    await board.allow("alpha", POLICY)
    await board.record("beta", POLICY, "failure")
    await other.allow("gamma", POLICY)
    await client.set(f"{prefix}breaker:broken", "{not json")

    snaps = await board.snapshots()
    assert set(snaps) == {"alpha", "beta"}
    assert snaps["beta"].consecutive_failures == 1
    assert set(await other.snapshots()) == {"gamma"}

    # A damaged entry restarts closed and is rewritten, not left to fail every call.
    assert await board.allow("broken", POLICY) == (True, None, [])
    assert (await board.snapshots())["broken"].state is BreakerState.CLOSED


# -- events -----------------------------------------------------------------------------------


async def _wait_subscribed(client: aioredis.Redis, channel: str, count: int = 1) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        [(_, n)] = await client.pubsub_numsub(channel)
        if n >= count:
            return
        assert time.monotonic() < deadline, f"nobody subscribed to {channel}"
        await asyncio.sleep(0.01)


async def _patterns(client: aioredis.Redis, name: str) -> int:
    """Pattern subscriptions held by the connections named ``name`` (PUBSUB NUMPAT counts
    every client of the server, other tests' included)."""
    return sum(int(info.get("psub", 0)) for info in await client.client_list()
               if info.get("name") == name)


async def _wait_psubscribed(client: aioredis.Redis, name: str, count: int = 1) -> None:
    deadline = time.monotonic() + PATIENCE
    while await _patterns(client, name) < count:
        assert time.monotonic() < deadline, f"{name} holds no pattern subscription"
        await asyncio.sleep(0.01)


Stream = AsyncGenerator[dict[str, Any], None]


async def _subscribed(connect: Connect, prefix: str) -> tuple[
        aioredis.Redis, Stream, Stream, asyncio.Task[dict[str, Any]],
        asyncio.Task[dict[str, Any]]]:
    """A listener client subscribed to ``run-1`` and to ``*``, each already reading its
    first event (a task)."""
    name = f"listener-{uuid.uuid4().hex[:8]}"
    listener_client = connect(client_name=name)
    listener = RedisEventBus(listener_client, prefix)
    one_run = listener.subscribe("run-1")
    every_run = listener.subscribe("*")
    first = asyncio.create_task(anext(one_run))
    first_any = asyncio.create_task(anext(every_run))
    await _wait_subscribed(listener_client, listener.channel("run-1"))
    await _wait_psubscribed(listener_client, name)
    return listener_client, one_run, every_run, first, first_any


async def test_events_published_on_one_client_reach_subscribers_on_another(
    connect: Connect, prefix: str
) -> None:
    publisher = RedisEventBus(connect(), prefix)
    listener_client, one_run, every_run, first, first_any = await _subscribed(connect, prefix)
    listener = RedisEventBus(listener_client, prefix)

    await publisher.publish("run-2", {"run_id": "run-2", "kind": "step"})
    await publisher.publish("run-1", {"run_id": "run-1", "kind": "done", "n": 1})

    assert await asyncio.wait_for(first, 30) == {"run_id": "run-1", "kind": "done", "n": 1}
    assert (await asyncio.wait_for(first_any, 30))["run_id"] == "run-2"
    assert (await asyncio.wait_for(anext(every_run), 30))["run_id"] == "run-1"

    await one_run.aclose()
    await every_run.aclose()
    [(_, n)] = await listener_client.pubsub_numsub(listener.channel("run-1"))
    assert n == 0  # closing the generator unsubscribed
    name = str(listener_client.get_connection_kwargs()["client_name"])
    assert await _patterns(listener_client, name) == 0


async def _bus_for(kind: str, connect: Connect, prefix: str) -> tuple[
        LocalEventBus | RedisEventBus, LocalEventBus | RedisEventBus, str]:
    """A publishing bus and a listening bus (for Redis, on separate clients; the listener's
    connections named, to see its subscriptions)."""
    if kind == "local":
        bus = LocalEventBus()
        return bus, bus, ""
    name = f"tree-{uuid.uuid4().hex[:8]}"
    return (RedisEventBus(connect(), prefix),
            RedisEventBus(connect(client_name=name), prefix), name)


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_a_tree_subscriber_hears_its_tree_once_and_nothing_else(
        kind: str, connect: Connect, prefix: str) -> None:
    """A run tree's stream (an SSE ``?tree=true`` stream, a chat turn) gets the root's and
    every descendant's events, each once and in order, and never another run's, even one
    whose id starts with the root's."""
    publisher, listener, name = await _bus_for(kind, connect, prefix)
    tree = listener.subscribe("run-1", tree=True)
    first = asyncio.create_task(anext(tree))
    if isinstance(listener, RedisEventBus):
        client = connect()
        await _wait_subscribed(client, listener.channel("run-1"))
        await _wait_psubscribed(client, name)
    else:
        await asyncio.sleep(0)
    order = ["run-2", "run-1", "run-10", "run-1.1", "run-1x.1", "run-1.1.2", "run-2.1",
             "run-1.3", "run-1"]
    for n, run_id in enumerate(order):
        await publisher.publish(run_id, {"run_id": run_id, "n": n})
    heard = [await asyncio.wait_for(first, PATIENCE)]
    while heard[-1]["n"] < len(order) - 1:
        heard.append(await asyncio.wait_for(anext(tree), PATIENCE))
    assert [(e["run_id"], e["n"]) for e in heard] == [
        ("run-1", 1), ("run-1.1", 3), ("run-1.1.2", 5), ("run-1.3", 7), ("run-1", 8)]
    await tree.aclose()


async def test_an_outbox_of_deltas_reaches_a_subscriber_in_order(
    connect: Connect, prefix: str
) -> None:
    """Many events put at once (a streaming model's deltas) leave in batches over a pooled
    client and arrive in the order they were emitted, on the run's channel and on ``*``."""
    publisher = RedisEventBus(connect(), prefix)
    _, one_run, every_run, first, first_any = await _subscribed(connect, prefix)

    outbox = Outbox(publisher)
    for index in range(600):  # more than one batch
        outbox.put({"type": "message.delta", "run_id": "run-1", "step": 1, "attempt": 1,
                    "index": index, "text": "x"})
    await asyncio.wait_for(outbox.flush(), PATIENCE)

    got = [(await asyncio.wait_for(first, PATIENCE))["index"]]
    got_any = [(await asyncio.wait_for(first_any, PATIENCE))["index"]]
    while len(got) < 600:
        got.append((await asyncio.wait_for(anext(one_run), PATIENCE))["index"])
    while len(got_any) < 600:
        got_any.append((await asyncio.wait_for(anext(every_run), PATIENCE))["index"])
    assert got == got_any == list(range(600))
    await one_run.aclose()
    await every_run.aclose()


async def test_subscriber_skips_messages_that_are_not_events(connect: Connect, prefix: str) -> None:
    client = connect()
    bus = RedisEventBus(client, prefix)
    events = bus.subscribe("r")
    first = asyncio.create_task(anext(events))
    await _wait_subscribed(client, bus.channel("r"))
    await client.publish(bus.channel("r"), "not json")
    await client.publish(bus.channel("r"), "[1, 2]")
    await bus.publish("r", {"ok": True})
    assert await asyncio.wait_for(first, 30) == {"ok": True}
    await events.aclose()


async def test_subscriber_resubscribes_after_a_dropped_connection(
    connect: Connect, prefix: str
) -> None:
    name = f"listener-{uuid.uuid4().hex[:8]}"
    admin = connect()
    bus = RedisEventBus(connect(client_name=name), prefix)
    events = bus.subscribe("r")
    first = asyncio.create_task(anext(events))
    await _wait_subscribed(admin, bus.channel("r"))
    killed = 0
    for info in await admin.client_list():
        if info.get("name") == name:
            killed += await admin.client_kill_filter(_id=info["id"])
    assert killed == 1
    await _wait_subscribed(admin, bus.channel("r"))  # back without the consumer doing anything
    await RedisEventBus(admin, prefix).publish("r", {"after": "reconnect"})
    assert await asyncio.wait_for(first, 30) == {"after": "reconnect"}
    await events.aclose()


async def test_cancelled_subscriber_cleans_up(connect: Connect, prefix: str) -> None:
    client = connect()
    bus = RedisEventBus(client, prefix)

    async def consume() -> None:
        async for _ in bus.subscribe("run-x"):
            pass

    task = asyncio.create_task(consume())
    await _wait_subscribed(client, bus.channel("run-x"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [(_, n)] = await client.pubsub_numsub(bus.channel("run-x"))
    assert n == 0


async def test_a_subscriber_cancelled_while_it_subscribes_still_stops(
        connect: Connect, prefix: str) -> None:
    """Cancelled at every point of its start (connect, handshake, SUBSCRIBE), it ends: on
    Python 3.11 a cancellation landing as a socket write completes used to be swallowed by
    ``wait_for`` and the subscriber then blocked forever (holding its SSE stream open)."""
    bus = RedisEventBus(connect(), prefix)
    stuck = []
    for yields in range(16):
        async def consume() -> None:
            async for _ in bus.subscribe("run-y"):
                pass

        task = asyncio.create_task(consume())
        for _ in range(yields):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            stuck.append(yields)
            task.cancel()
    assert stuck == []


# -- dispatch ---------------------------------------------------------------------------------


async def test_every_dispatched_run_is_delivered_exactly_once(
    connect: Connect, prefix: str
) -> None:
    stream = f"{prefix}runs"
    producer = RedisDispatcher(connect(), stream=stream)
    w1 = RedisDispatcher(connect(), stream=stream)
    w2 = RedisDispatcher(connect(), stream=stream)
    ids = [f"run-{i}" for i in range(10)]
    for run_id in ids:
        await producer.dispatch(run_id)

    got: dict[str, list[str]] = {"w1": [], "w2": []}
    # Take turns first so both consumers certainly read some, then race for the rest.
    for _ in range(2):
        for name, worker in (("w1", w1), ("w2", w2)):
            item = await worker.next(name, 0.5)
            assert item is not None
            got[name].append(item[1])
            await worker.ack(item[0])

    async def drain(name: str, worker: RedisDispatcher) -> None:
        while (item := await worker.next(name, 0.2)) is not None:
            got[name].append(item[1])
            await worker.ack(item[0])

    await asyncio.gather(drain("w1", w1), drain("w2", w2))

    delivered = got["w1"] + got["w2"]
    assert sorted(delivered) == sorted(ids)  # every id, no duplicates
    assert got["w1"] and got["w2"]
    admin = connect()
    assert (await admin.xpending(stream, "workers"))["pending"] == 0
    assert await admin.xlen(stream) == 0  # acked entries are deleted


async def test_entries_of_a_dead_consumer_are_reclaimed(connect: Connect, prefix: str) -> None:
    stream = f"{prefix}runs"
    dying = RedisDispatcher(connect(), stream=stream)
    survivor = RedisDispatcher(connect(), stream=stream)
    for run_id in ("a", "b", "c"):
        await dying.dispatch(run_id)
    taken = [await dying.next("dying", 0.5) for _ in range(3)]
    assert [t[1] for t in taken if t] == ["a", "b", "c"]
    # ... and the consumer dies without acking.

    assert await survivor.next("survivor", 0.05) is None  # nothing new to read
    assert await survivor.reclaim("survivor", 3600) == []  # not idle long enough yet
    await asyncio.sleep(0.25)
    reclaimed = await survivor.reclaim("survivor", 0.2)
    assert reclaimed == taken
    for delivery_id, _ in reclaimed:
        await survivor.ack(delivery_id)
    assert (await connect().xpending(stream, "workers"))["pending"] == 0
    assert await survivor.reclaim("survivor", 0) == []


async def test_dispatch_recovers_when_the_stream_and_group_vanish(
    connect: Connect, prefix: str
) -> None:
    stream = f"{prefix}runs"
    admin = connect()
    worker = RedisDispatcher(connect(), stream=stream)
    await worker.dispatch("before")
    item = await worker.next("w", 0.5)
    assert item is not None and item[1] == "before"

    await admin.delete(stream)  # what a restart without persistence looks like
    assert await worker.next("w", 0.05) is None  # NOGROUP handled: group recreated
    await worker.dispatch("after")
    item = await worker.next("w", 0.5)
    assert item is not None and item[1] == "after"
    await worker.ack(item[0])

    # Dispatched while the group is gone: the recreated group (from id 0) still delivers it.
    await admin.delete(stream)
    await worker.dispatch("orphan")
    assert (await worker.next("w", 0.5) or ("", ""))[1] == "orphan"
    await admin.delete(stream)
    assert await worker.reclaim("w", 0) == []


async def test_dispatcher_survives_dropped_connections(connect: Connect, prefix: str) -> None:
    stream = f"{prefix}runs"
    name = f"worker-{uuid.uuid4().hex[:8]}"
    admin = connect()
    worker = RedisDispatcher(connect(client_name=name), stream=stream, backoff=0.01)
    await worker.dispatch("one")
    assert (await worker.next("w", 0.5) or ("", ""))[1] == "one"

    # Simulate a restart: drop this worker's connections and lose the stream.
    killed = 0
    for info in await admin.client_list():
        if info.get("name") == name:
            killed += await admin.client_kill_filter(_id=info["id"])
    assert killed >= 1
    await admin.delete(stream)

    await worker.dispatch("two")
    item = await worker.next("w", 0.5)
    assert item is not None and item[1] == "two"


async def test_junk_entries_are_settled_and_skipped(connect: Connect, prefix: str) -> None:
    stream = f"{prefix}runs"
    admin = connect()
    worker = RedisDispatcher(connect(), stream=stream)
    assert await worker.reclaim("w", 0) == []  # creates the group on an empty stream
    await admin.xadd(stream, {"something": "else"})
    await worker.dispatch("real")
    assert (await worker.next("w", 0.5) or ("", ""))[1] == "real"
    await admin.xadd(stream, {"something": "else"})
    assert await worker.next("dies", 0.1) is None
    assert (await admin.xpending(stream, "workers"))["pending"] == 1  # only "real"
    await admin.xadd(stream, {"run_id": "lost"})
    await admin.xreadgroup("workers", "dies", {stream: ">"})  # read, never acked
    await admin.xadd(stream, {"junk": "1"})
    await admin.xreadgroup("workers", "dies", {stream: ">"})
    assert [r for _, r in await worker.reclaim("w", 0)] == ["real", "lost"]


async def test_transient_errors_are_retried(
    connect: Connect, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect()
    worker = RedisDispatcher(client, stream=f"{prefix}runs", backoff=0.01)
    real_xadd = client.xadd
    failures = iter([RedisConnectionError("boom"), RedisConnectionError("boom")])

    async def flaky_xadd(*args: Any, **kwargs: Any) -> Any:
        exc = next(failures, None)
        if exc is not None:
            raise exc
        return await real_xadd(*args, **kwargs)

    monkeypatch.setattr(client, "xadd", flaky_xadd)
    await worker.dispatch("run-1")
    assert (await worker.next("w", 0.5) or ("", ""))[1] == "run-1"


async def test_unreachable_redis_degrades_instead_of_failing(connect: Connect) -> None:
    # Nothing listens on port 1; no client-side retries so the test stays fast.
    dead = connect("redis://127.0.0.1:1/0", retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)
    worker = RedisDispatcher(dead, stream="alpaca-test:none", backoff=0.01, attempts=2)
    await worker.dispatch("lost")  # logged; the store still has the run
    assert await worker.next("w", 0.1) is None
    await worker.ack("1-0")
    assert await worker.reclaim("w", 0) == []


# -- factory ----------------------------------------------------------------------------------


async def test_factory_without_url_is_in_process() -> None:
    coord = make_coordination(None)
    assert isinstance(coord.breakers, LocalBreakerBoard)
    assert isinstance(coord.events, LocalEventBus)
    assert coord.dispatcher is None
    await coord.close()


async def test_factory_with_url_shares_one_redis_client(prefix: str) -> None:
    clock = FakeClock()
    coord = make_coordination(REDIS_URL, clock, prefix=prefix)
    try:
        assert isinstance(coord.breakers, RedisBreakerBoard)
        assert isinstance(coord.events, RedisEventBus)
        assert isinstance(coord.dispatcher, RedisDispatcher)
        assert coord.dispatcher.stream == f"{prefix}runs"
        await coord.dispatcher.dispatch("r")
        assert (await coord.dispatcher.next("w", 0.5) or ("", ""))[1] == "r"
        await coord.breakers.record("x", POLICY, "failure")
        assert (await coord.breakers.snapshots())["x"].consecutive_failures == 1
    finally:
        await coord.close()

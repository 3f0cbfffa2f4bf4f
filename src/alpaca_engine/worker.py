"""``alpaca worker``: claim queued runs, resume crashed ones, drain on SIGTERM.

On start (and periodically) the reaper requeues runs whose lease expired or whose owner
process on this host is gone, so a crashed run resumes without anyone asking.

With a dispatch stream, a free slot takes the next delivery (every queued run, a delegated
child and a woken parent included, is announced there); the store's queue is polled once a
poll interval, as the safety net for a run whose announcement was lost. Without one, the
store is polled whenever a slot is free.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Awaitable
from typing import TypeVar

from .engine import Engine
from .errors import NotFound
from .faults import Unavailable
from .store.records import RunRecord

log = logging.getLogger("alpaca.worker")

CANCEL_GRACE = 5.0
"""Seconds a cancelled wait (a blocking read of the dispatch stream) gets to unwind before the
worker goes on without it: a driver that does not honour a cancellation promptly must not
keep a stopping worker alive."""

T = TypeVar("T")


class Worker:
    def __init__(self, engine: Engine, *, concurrency: int = 8, poll_interval: float = 0.5,
                 reap_interval: float = 5.0, drain_timeout: float = 10.0) -> None:
        self.engine = engine
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.reap_interval = reap_interval
        self.drain_timeout = drain_timeout
        self._stopping = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[object]] = {}
        self._started: dict[str, float] = {}
        self._slot_freed = asyncio.Event()
        self._polled = -1e18
        """When the store's queue was last polled (monotonic seconds)."""
        self._reaping: asyncio.Task[None] | None = None
        self._down = False
        self.completed = 0

    def stop(self) -> None:
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self, *, until_idle: bool = False) -> None:
        """Work until stopped (or, with ``until_idle``, until nothing is left to do)."""
        last_reap = -1e18
        while not self._stopping.is_set():
            now = self.engine.clock.now()
            if now - last_reap >= self.reap_interval and (
                    self._reaping is None or self._reaping.done()):
                # In its own task: a reaper blocked on a row lock must not stop claiming.
                self._reaping = asyncio.create_task(self._reap())
                last_reap = now
                if until_idle:
                    await self._reaping
            claimed = await self._fill(poll=until_idle)
            if until_idle and not claimed and not self._tasks:
                return
            if not claimed:
                await self._wait_for_work()
        if self._reaping is not None:
            self._reaping.cancel()
            await asyncio.gather(self._reaping, return_exceptions=True)
        await self._drain()

    def _free(self) -> bool:
        return len(self._tasks) < self.concurrency and not self._stopping.is_set()

    async def _fill(self, *, poll: bool = False) -> bool:
        """Start runs in the free slots; True when any started.

        Deliveries the dispatch stream has ready come first: each announces a queued run, and
        claiming it settles it (a store poll that took the same run would leave it to be
        claimed in vain). The store's queue is polled without a stream, with ``poll``, or
        when a poll interval has passed since the last poll."""
        claimed = False
        dispatcher = self.engine.dispatcher
        while dispatcher is not None and self._free():
            got = await dispatcher.next(self.engine.owner, 0)
            if got is None:
                break
            claimed = await self._take(*got) or claimed
        now = time.monotonic()
        if dispatcher is not None and not poll and now - self._polled < self.poll_interval:
            return claimed
        self._polled = now
        while self._free():
            try:
                run = await self.engine.store.claim_next(
                    self.engine.owner, self.engine.lease_seconds, self.engine.clock.now())
            except Unavailable as exc:
                # The database is down or full: say so once, keep trying; never crash.
                self._outage(exc)
                break
            self._outage(None)
            if run is None:
                break
            claimed = True
            self._start(run)
        return claimed

    def _outage(self, exc: Unavailable | None) -> None:
        """One log line when the store becomes unusable and one when it is back."""
        was, self._down = self._down, exc is not None
        if exc is not None and not was:
            log.warning("%s; retrying every %gs", exc, self.poll_interval)
        elif exc is None and was:
            log.warning("the store is usable again")

    async def _reap(self) -> None:
        try:
            requeued = await self.engine.reap()
            for run_id in requeued:
                log.info("requeued run %s", run_id,
                         extra={"run_id": run_id, "event": "run.requeued"})
            await self._reclaim()
        except Unavailable as exc:
            self._outage(exc)
        except Exception:
            log.exception("reaper sweep failed; retrying at the next interval")

    def _start(self, run: RunRecord) -> None:
        log.info("claimed run %s (agent %s, epoch %d)", run.id, run.agent, run.epoch,
                 extra={"run_id": run.id, "event": "run.claimed", "agent": run.agent,
                        "epoch": run.epoch})
        task = asyncio.create_task(self.engine.drive(run))
        self._tasks[run.id] = task
        self._started[run.id] = time.monotonic()
        task.add_done_callback(functools.partial(self._done, run.id))

    async def _wait_for_work(self) -> None:
        """Block on the dispatch stream when there is one and a slot is free, else until a
        slot frees; a stop or a poll interval ends either wait."""
        dispatcher = self.engine.dispatcher
        if dispatcher is None or len(self._tasks) >= self.concurrency:
            self._slot_freed.clear()
            await self._until(self._slot_freed.wait(), self.poll_interval)
            return
        reading = await self._until(dispatcher.next(self.engine.owner, self.poll_interval))
        if reading.done() and not reading.cancelled() and (got := reading.result()):
            await self._take(*got)

    async def _until(self, work: Awaitable[T],
                     seconds: float | None = None) -> asyncio.Future[T]:
        """Wait for ``work``, a stop or ``seconds``, whichever comes first, and hand back
        ``work`` (cancelled if it had not finished: a stopped worker's read of the stream
        leaves any delivery pending for a reclaim, and the store poll finds the run anyway)."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([task, stop], timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (task, stop):
                waiter.cancel()
            _, stuck = await asyncio.wait([task, stop], timeout=CANCEL_GRACE)
            if stuck:
                log.warning("a cancelled wait did not end within %gs; going on without it",
                            CANCEL_GRACE)
                for waiter in stuck:  # whatever it ends with later is retrieved, not reported
                    waiter.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _take(self, delivery_id: str, run_id: str) -> bool:
        """Claim a delivered run (True: started); the store's lease decides, the delivery is
        only a hint."""
        dispatcher = self.engine.dispatcher
        try:
            run = await self.engine.store.claim_run(
                run_id, self.engine.owner, self.engine.lease_seconds, self.engine.clock.now(),
                max_attempts=self.engine.max_run_attempts)
        except NotFound:
            run = None
        except Unavailable as exc:  # not acked: redelivered, and the store poll finds it too
            self._outage(exc)
            return False
        if dispatcher is not None:
            await dispatcher.ack(delivery_id)
        if run is not None:
            self._start(run)
        return run is not None

    async def _reclaim(self) -> None:
        dispatcher = self.engine.dispatcher
        if dispatcher is None:
            return
        for delivery_id, run_id in await dispatcher.reclaim(
                self.engine.owner, max(self.engine.lease_seconds, 1.0)):
            if len(self._tasks) >= self.concurrency:
                break
            await self._take(delivery_id, run_id)

    def _done(self, run_id: str, task: asyncio.Task[object]) -> None:
        self._tasks.pop(run_id, None)
        seconds = round(time.monotonic() - self._started.pop(run_id, time.monotonic()), 3)
        self.completed += 1
        self._slot_freed.set()
        if task.cancelled():
            return  # drained: _drain logs the release
        exc = task.exception()
        if isinstance(exc, Unavailable):
            # Nothing more could be written; its lease expires and a worker resumes it.
            log.warning("run %s left for a later resume: %s", run_id, exc)
            return
        if exc is not None:
            log.error("run %s crashed the worker task: %r", run_id, exc)
            return
        result = task.result()
        if not isinstance(result, RunRecord):
            return
        event = "run.finished" if result.state.terminal else "run.paused"
        log.info("run %s %s after %.3f s", run_id, result.state, seconds,
                 extra={"run_id": run_id, "event": event, "state": str(result.state),
                        "duration_s": seconds})

    async def _drain(self) -> None:
        """Let in-flight runs finish for a while, then hand the rest back to the queue."""
        if not self._tasks:
            return
        log.info("draining %d run(s)", len(self._tasks))
        _done, pending = await asyncio.wait(list(self._tasks.values()),
                                            timeout=self.drain_timeout)
        unfinished = [rid for rid, t in self._tasks.items() if t in pending]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for run_id in unfinished:
            try:
                run = await self.engine.store.get_run(run_id)
                if run.lease_owner == self.engine.owner and not run.state.terminal:
                    await self.engine.release(run_id, run.epoch)
                    log.info("released run %s back to the queue (shutting down)", run_id,
                             extra={"run_id": run_id, "event": "run.released"})
            except Unavailable as exc:  # its lease expires instead
                log.warning("run %s not released: %s", run_id, exc)

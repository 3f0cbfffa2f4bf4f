"""``alpaca worker``: claim queued runs, resume crashed ones, drain on SIGTERM.

On start (and periodically) the reaper requeues runs whose lease expired or whose owner
process on this host is gone, so a crashed run resumes without anyone asking.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal

from .engine import Engine
from .errors import NotFound
from .store.records import RunRecord

log = logging.getLogger("alpaca.worker")


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
        self._slot_freed = asyncio.Event()
        self._reaping: asyncio.Task[None] | None = None
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
            claimed = False
            while len(self._tasks) < self.concurrency and not self._stopping.is_set():
                run = await self.engine.store.claim_next(
                    self.engine.owner, self.engine.lease_seconds, self.engine.clock.now())
                if run is None:
                    break
                claimed = True
                self._start(run)
            if until_idle and not claimed and not self._tasks:
                return
            if not claimed:
                await self._wait_for_work()
        if self._reaping is not None:
            self._reaping.cancel()
            await asyncio.gather(self._reaping, return_exceptions=True)
        await self._drain()

    async def _reap(self) -> None:
        try:
            requeued = await self.engine.reap()
            if requeued:
                log.info("requeued %d run(s): %s", len(requeued), ", ".join(requeued))
            await self._reclaim()
        except Exception:
            log.exception("reaper sweep failed; retrying at the next interval")

    def _start(self, run: RunRecord) -> None:
        task = asyncio.create_task(self.engine.drive(run))
        self._tasks[run.id] = task
        task.add_done_callback(functools.partial(self._done, run.id))

    async def _wait_for_work(self) -> None:
        """Block on the dispatch stream when there is one, else sleep a poll interval."""
        dispatcher = self.engine.dispatcher
        if dispatcher is None or len(self._tasks) >= self.concurrency:
            # Wake on stop, on a freed slot, or after a poll interval, whichever comes first.
            self._slot_freed.clear()
            waiters = [asyncio.ensure_future(self._stopping.wait()),
                       asyncio.ensure_future(self._slot_freed.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.poll_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            return
        got = await dispatcher.next(self.engine.owner, self.poll_interval)
        if got is not None:
            await self._take(*got)

    async def _take(self, delivery_id: str, run_id: str) -> None:
        """Claim a delivered run; the store's lease decides, the delivery is only a hint."""
        dispatcher = self.engine.dispatcher
        try:
            run = await self.engine.store.claim_run(
                run_id, self.engine.owner, self.engine.lease_seconds, self.engine.clock.now(),
                max_attempts=self.engine.max_run_attempts)
        except NotFound:
            run = None
        if dispatcher is not None:
            await dispatcher.ack(delivery_id)
        if run is not None:
            self._start(run)

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
        self.completed += 1
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("run %s crashed the worker task: %r", run_id, task.exception())

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
            run = await self.engine.store.get_run(run_id)
            if run.lease_owner == self.engine.owner and not run.state.terminal:
                await self.engine.release(run_id, run.epoch)

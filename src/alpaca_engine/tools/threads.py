"""Sync tools run on daemon threads, so a call abandoned after its timeout cannot hold the
process.

Python cannot stop a thread. ``asyncio.to_thread`` would run a blocking tool on the loop's
default executor, whose (non-daemon) threads are joined by ``asyncio.run`` on the way out and
again at interpreter exit: a tool stuck in ``time.sleep(600)`` past its 0.5 s timeout would keep
``alpaca run`` alive for ten minutes after the run was recorded. Here each call gets an idle
daemon thread (a new one when none is idle), nobody joins them, and an abandoned call simply
finishes, or not, on its own. Its side effect may still happen: see "Tools are untrusted code"
in the README for how the idempotency key covers that.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .base import AbruptExit

T = TypeVar("T")

_Work = tuple[Future[Any], Callable[[], Any]]


class DaemonThreads:
    """A grow-on-demand pool of daemon threads; every submitted call has a thread at once."""

    def __init__(self, name: str = "alpaca-tool") -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._count = itertools.count(1)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            # Reserve an idle thread, or start one: a blocked call never delays the next one.
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        if spawn:
            threading.Thread(target=self._work, name=f"{self._name}-{next(self._count)}",
                             daemon=True).start()
        self._queue.put((future, fn))
        return future

    def _work(self) -> None:
        while True:
            future, fn = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # SystemExit too: the caller decides what it means
                    future.set_exception(exc)
            del future, fn
            with self._lock:
                self._idle += 1


_POOL = DaemonThreads()


async def run_sync(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Like ``asyncio.to_thread`` (context variables included), on a daemon thread.

    A GeneratorExit from ``fn`` comes back as AbruptExit: thrown into the awaiting task as
    it is, it would close the frames awaiting it (the runner's, for a tool without a
    timeout) instead of reaching them."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.wrap_future(_POOL.submit(functools.partial(_no_generator_exit, call)))


def _no_generator_exit(call: Callable[[], T]) -> T:
    try:
        return call()
    except GeneratorExit as exc:
        raise AbruptExit(exc) from None

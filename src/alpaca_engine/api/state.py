"""What the routes share: store, engine, served workflows, auth and the metrics cache."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fastapi import Request

from .. import doctor
from ..config import Settings
from ..engine import Engine
from ..faults import FaultWatch
from ..store.base import Store
from ..workflow import Workflow
from .auth import Authenticator
from .problems import ProblemError


def workflow_ref(path: str) -> str:
    """The ref a workflow option names: ``builtin:NAME`` as is, a file by absolute path."""
    return path if path.startswith("builtin:") else str(Path(path).resolve())


@dataclass
class ServedWorkflows:
    """The workflows ``POST /v1/runs`` may use, by ref (and by the name given on the CLI)."""

    workflows: list[Workflow]
    aliases: dict[str, Workflow] = field(default_factory=dict)

    @property
    def default(self) -> Workflow:
        return self.workflows[0]

    def get(self, name: str | None) -> Workflow:
        if name is None:
            return self.default
        for wf in self.workflows:
            if wf.ref == name:
                return wf
        found = self.aliases.get(name)
        if found is None:
            served = ", ".join(wf.ref for wf in self.workflows)
            raise ProblemError(422, "unknown_workflow",
                               f"workflow {name!r} is not served here (served: {served})")
        return found


class MetricsCache:
    """Store-backed gauges for ``/metrics``: computed at most every ``ttl`` seconds so a
    scrape never walks the whole store, and read synchronously by the Prometheus collector."""

    def __init__(self, store: Store, ttl: float = 5.0) -> None:
        self.store = store
        self.ttl = ttl
        self.orphans = 0
        self.counts: dict[str, int] = {}
        self._at = -1e18
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return
            report = await doctor.check(self.store)
            self.orphans = len(report.orphans)
            self.counts = dict(report.counts)
            self._at = time.monotonic()

    def orphan_count(self) -> int:
        return self.orphans

    def state_counts(self) -> dict[str, int]:
        return dict(self.counts)


@dataclass
class ApiState:
    settings: Settings
    store: Store
    engine: Engine
    served: ServedWorkflows
    auth: Authenticator
    metrics: MetricsCache
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    faults: FaultWatch = field(default_factory=FaultWatch)
    """Store faults requests hit recently; ``/readyz`` reports them."""

    async def publish(self, run_id: str, event: dict[str, Any]) -> None:
        """Best effort: wake SSE streams and waiters of ``run_id`` (they also poll)."""
        if self.engine.events is not None:
            with contextlib.suppress(Exception):
                await self.engine.events.publish(run_id, {"run_id": run_id, **event})


def get_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.alpaca
    return state


DELTA = "message.delta"
MAX_HELD_DELTAS = 4096
"""Deltas a Waker holds for a stream that has not sent them yet; older ones are dropped
(the client sees a gap in ``index``) rather than a slow client growing the server."""


class Waker:
    """Wakes a poller early when the event bus reports activity on a run (or, with
    ``tree=True``, on the run or any run it delegated to: their ids extend its id).

    Events are only a hint (a publish can race the subscription or be dropped), so callers
    always re-read the store and wait at most ``poll`` seconds. Leaving never waits on the
    bus: the listener is cancelled and finishes on its own, so a response that used a Waker
    ends as soon as its last byte is sent.

    ``message.delta`` events are not hints (the store has nothing new for them): they never
    wake a store read. With ``deltas=True`` the Waker keeps them, in arrival order, for
    :meth:`take_deltas` (an SSE stream forwards them).
    """

    _leaving: ClassVar[set[asyncio.Task[None]]] = set()  # cancelled listeners still closing

    def __init__(self, engine: Engine, run_id: str, *, tree: bool = False,
                 deltas: bool = False) -> None:
        self.engine = engine
        self.run_id = run_id
        self.tree = tree
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._keep_deltas = deltas
        self._deltas: deque[dict[str, Any]] = deque(maxlen=MAX_HELD_DELTAS)
        self._delta = asyncio.Event()

    async def __aenter__(self) -> Waker:
        if self.engine.events is not None:
            self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            Waker._leaving.add(task)
            task.add_done_callback(Waker._leaving.discard)

    def _concerns(self, event: dict[str, Any]) -> bool:
        run_id = str(event.get("run_id", ""))
        return run_id == self.run_id or (self.tree and run_id.startswith(self.run_id + "."))

    async def _listen(self) -> None:
        assert self.engine.events is not None
        with contextlib.suppress(Exception):
            stream: AsyncIterator[dict[str, Any]] = self.engine.events.subscribe(
                self.run_id, tree=self.tree)
            async for event in stream:
                if not self._concerns(event):
                    continue
                if event.get("type") != DELTA:
                    self._event.set()
                elif self._keep_deltas:
                    self._deltas.append(event)
                    self._delta.set()

    def take_deltas(self) -> list[dict[str, Any]]:
        """The deltas received since the last call, oldest first."""
        taken = list(self._deltas)
        self._deltas.clear()
        self._delta.clear()
        return taken

    async def wait(self, poll: float) -> bool:
        """Until the bus hints at news in the store or ``poll`` seconds pass (True: read the
        store), or deltas arrive (False: only :meth:`take_deltas` has news)."""
        if self._delta.is_set() and not self._event.is_set():
            return False
        hint = asyncio.ensure_future(self._event.wait())
        waits: set[asyncio.Future[Any]] = {hint}
        if self._keep_deltas:
            waits.add(asyncio.ensure_future(self._delta.wait()))
        try:
            await asyncio.wait(waits, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        if self._event.is_set() or not self._delta.is_set():
            self._event.clear()
            return True
        return False


class LocalDispatcher:
    """Wakes the embedded worker as soon as the API queues a run, when there is no Redis
    stream to do it (the worker would otherwise find the run at its next poll)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._n = 0

    async def dispatch(self, run_id: str) -> None:
        self._queue.put_nowait(run_id)

    async def next(self, consumer: str, block_seconds: float) -> tuple[str, str] | None:
        try:
            run_id = await asyncio.wait_for(self._queue.get(), block_seconds)
        except TimeoutError:
            return None
        self._n += 1
        return str(self._n), run_id

    async def ack(self, delivery_id: str) -> None:
        return None

    async def reclaim(self, consumer: str, min_idle_seconds: float) -> list[tuple[str, str]]:
        return []

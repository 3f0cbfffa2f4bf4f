"""``engine.chat_stream``: one turn of a thread, its answer yielded as the model writes it.

No second delta path: the runner emits ``message.delta`` (deltas.py) through the Engine to
its event bus, exactly what SSE streams forward; the stream subscribes to that bus (an
in-process one is attached when the engine has none) and keeps the events of the turn's run
tree. It knows it has everything without guessing at timing: it posts a marker on the bus
when its subscription is live (before the turn starts) and another once the turn has ended
and the engine's outbox is flushed; the bus keeps order, so every event of the turn comes
before the end marker.

``async for piece in engine.chat_stream(thread_id, "text")`` yields :class:`ChatDelta`
pieces of the answer (with ``steps=True`` also :class:`ChatStep`: tool calls, delegations,
approval requests) and stops when the turn ends; the stream's ``run`` is then the turn's run,
terminal or waiting (as ``engine.chat`` returns it). ``engine.chat_stream(thread_id)`` with
no text continues the thread's unfinished last turn (queued after an approval was decided,
or handed back by an interrupted stream). A stream closed before its turn ended
(``aclose()``, or its task cancelled, e.g. by Ctrl-C) stops running the turn here and hands
it back to the queue, journal intact: continuing it resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .coord.base import EventBus
from .coord.local import LocalEventBus
from .coord.outbox import Outbox
from .lifecycle import RunState
from .store.records import RunRecord

if TYPE_CHECKING:
    from .engine import Engine

MARKER = "chat.marker"
"""Event type of the stream's own start/end markers (no display shows them)."""
_SUBSCRIBE_TRIES = 50
_SUBSCRIBE_WAIT = 0.1


@dataclass(frozen=True)
class ChatDelta:
    """A piece of the turn's answer. Join ``text`` in order; a piece that ``restarted`` is
    the first of a retried stream of the same model step: drop what was shown for it (the
    run's ``output`` is authoritative)."""

    text: str
    run_id: str
    step: int
    attempt: int
    index: int

    @property
    def restarted(self) -> bool:
        return self.index == 0 and self.attempt > 1


@dataclass(frozen=True)
class ChatStep:
    """Something the turn did (yielded with ``steps=True``): a finished tool call (``tool``:
    ``result`` or ``error``), a delegation (``delegation``: ``name`` is the agent), or an
    action that waits for a supervisor (``approval``: ``approval_id``, ``reason``)."""

    kind: Literal["tool", "delegation", "approval"]
    run_id: str
    name: str
    arguments: Any = None
    result: Any = None
    error: dict[str, Any] | None = None
    approval_id: str | None = None
    reason: str | None = None


ChatEvent = ChatDelta | ChatStep


def _bus(engine: Engine) -> EventBus:
    """The engine's event bus; an in-process one (and its outbox) when it has none."""
    if engine.events is None:
        engine.events = LocalEventBus()
        engine.outbox = Outbox(engine.events)
    return engine.events


def _step(event: dict[str, Any]) -> ChatStep | None:
    kind, run_id = event.get("type"), str(event.get("run_id"))
    if kind == "step.completed" and event.get("kind") == "tool":
        return ChatStep("tool", run_id, str(event.get("name")), event.get("arguments"),
                        event.get("result"), event.get("error"))
    if kind == "delegation.started":
        return ChatStep("delegation", run_id, str(event.get("agent")))
    if kind == "approval.requested":
        return ChatStep("approval", run_id, str(event.get("action")), event.get("arguments"),
                        approval_id=str(event.get("approval_id")),
                        reason=str(event.get("reason")))
    return None


class ChatStream:
    """The async iterator ``engine.chat_stream`` returns (see the module doc). ``run_id`` is
    known once iteration started; ``run`` once it stopped."""

    def __init__(self, engine: Engine, thread_id: str, text: str | None, *,
                 tenant: str = "local", budget: dict[str, Any] | None = None,
                 steps: bool = False) -> None:
        self.engine = engine
        self.thread_id = thread_id
        self.text = text
        self.tenant = tenant
        self.budget = budget
        self.steps = steps
        self.run_id: str | None = None
        self.run: RunRecord | None = None
        self._token = uuid.uuid4().hex
        self._ready: deque[ChatEvent] = deque()
        self._arrived = asyncio.Event()
        self._started = asyncio.Event()
        self._ended = False
        self._deaf = False
        """No subscription (it never went live, or it broke): end when the turn does."""
        self._pump: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[RunRecord] | None = None

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> ChatEvent:
        try:
            if self._pump is None:
                await self._start()
            while not self._ready:
                if self._ended:
                    await self._finish()
                    raise StopAsyncIteration
                self._arrived.clear()
                await self._arrived.wait()
            return self._ready.popleft()
        except asyncio.CancelledError:
            await self.aclose()
            raise

    async def _start(self) -> None:
        run = await self._target()
        self.run_id = run.id
        self._pump = asyncio.create_task(self._listen(_bus(self.engine)))
        self._pump.add_done_callback(self._pump_gone)
        if not await self._subscribed():
            self._deaf = True
        self._turn = asyncio.create_task(self._drive(run))
        self._turn.add_done_callback(lambda _t: self._pump_gone(None))

    def _pump_gone(self, _task: asyncio.Task[None] | None) -> None:
        """The subscription ended: past the end marker, or broken (then wait for the turn
        alone: what was not delivered is in the run's output)."""
        if _task is not None and not self._ended:
            self._deaf = True
        if self._deaf and (self._turn is None or self._turn.done()):
            self._ended = True
            self._arrived.set()

    async def _target(self) -> RunRecord:
        """The turn to run: a new one for ``text``, else the last unfinished one."""
        if self.text is not None:
            record, _created = await self.engine.send_message(
                self.thread_id, self.text, tenant=self.tenant, budget=self.budget)
            return record
        await self.engine.store.get_thread(self.thread_id, self.tenant)  # NotFound if not ours
        turns = await self.engine.store.list_turns(self.thread_id)
        if not turns or turns[-1].state.terminal:
            raise ValueError(f"thread {self.thread_id} has no unfinished turn to continue")
        return turns[-1]

    async def _subscribed(self) -> bool:
        """Until the bus delivers this stream's start marker (its subscription is live)."""
        bus = _bus(self.engine)
        for _ in range(_SUBSCRIBE_TRIES):
            await asyncio.sleep(0)
            if self._pump is None or self._pump.done():
                return False
            with contextlib.suppress(Exception):
                await bus.publish(str(self.run_id), self._marker("start"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._started.wait(), _SUBSCRIBE_WAIT)
                return True
        return False

    def _marker(self, at: str) -> dict[str, Any]:
        return {"type": MARKER, "run_id": self.run_id, "token": self._token, "at": at}

    async def _listen(self, bus: Any) -> None:
        root = str(self.run_id)
        stream: AsyncIterator[dict[str, Any]] = bus.subscribe(root, tree=True)
        async for event in stream:
            run_id = str(event.get("run_id", ""))
            if run_id != root and not run_id.startswith(root + "."):
                continue
            if event.get("type") == MARKER:
                if event.get("token") == self._token and event.get("at") == "start":
                    self._started.set()
                elif event.get("token") == self._token:
                    self._ended = True
                    self._arrived.set()
                    return
                continue
            piece = self._convert(event, root)
            if piece is not None:
                self._ready.append(piece)
                self._arrived.set()

    def _convert(self, event: dict[str, Any], root: str) -> ChatEvent | None:
        if event.get("type") == "message.delta":
            text, step, attempt = event.get("text"), event.get("step"), event.get("attempt")
            if event.get("run_id") != root or not isinstance(text, str) or not (
                    isinstance(step, int) and isinstance(attempt, int)):
                return None  # the answer is the turn's own; a delegate's text is not it
            return ChatDelta(text, root, step, attempt, int(event.get("index") or 0))
        return _step(event) if self.steps else None

    async def _drive(self, run: RunRecord) -> RunRecord:
        """Run the turn's tree here, then post the end marker behind its last event."""
        engine = self.engine
        try:
            for running in await engine.store.list_runs(root_id=run.root_id,
                                                        state=RunState.RUNNING, limit=10_000):
                await engine.resume(running.id)  # RunBusy while a live process owns it
            return await engine.run_tree(run.root_id)
        finally:
            if engine.outbox is not None:
                await engine.outbox.flush()
            with contextlib.suppress(Exception):
                await _bus(engine).publish(str(self.run_id), self._marker("end"))

    async def _finish(self) -> None:
        assert self._turn is not None
        self.run = await self._turn  # its exception (a lost store, RunBusy) surfaces here

    async def aclose(self) -> None:
        """Stop: an unfinished turn stops running here and goes back to the queue."""
        turn, pump = self._turn, self._pump
        if pump is not None and not pump.done():
            pump.cancel()
        if turn is None or turn.done():
            return
        turn.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await turn
        await hand_back(self.engine, str(self.run_id))


async def hand_back(engine: Engine, root_id: str) -> list[str]:
    """Release every run of the tree this engine still leases back to the queue."""
    released = []
    for run in await engine.store.list_runs(root_id=root_id, state=RunState.RUNNING,
                                            limit=10_000):
        if run.lease_owner == engine.owner:
            await engine.release(run.id, run.epoch)
            released.append(run.id)
    return released

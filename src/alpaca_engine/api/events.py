"""Run event streams (Server-Sent Events): what is sent, in which order, and where to resume.

The wire contract, for any client (a browser ``EventSource``, a generated client, curl):

* Every event is the default SSE ``message`` event, so ``EventSource.onmessage`` sees all of
  them, including types added later; its ``data`` is JSON told apart by ``type``
  (:data:`.models.RunStreamEvent`): ``audit`` (one durable audit record) and ``end``.
* Durable events carry an ``id``: the position to resume after. On one run's stream it is the
  record's seq; on a ``tree=true`` stream it is a **tree cursor**, ``12,.3:7,.3.5:4``: the
  last seq sent of the streamed run, then ``path:seq`` for each run below it that sent
  something, where ``path`` is the run's id without the streamed run's id in front (child
  ids extend their parent's, ``run_x.3``; any other id is written out in full).
* Ephemeral events (``message.delta``: a piece of a model turn as a streaming model writes
  it) carry no ``id``: they come straight from the event bus, are never replayed, and a
  reconnect resumes after the last durable event. A delta is sent only before the durable
  record that completes its model step (``model.output``, a ``model.retry`` of its attempt,
  or any record of a later step): one that arrives later is dropped, the record holds the
  whole turn. Deltas of a step's retried attempt carry the next ``attempt``.
* ``end`` (no ``id``) comes once every run in the stream is terminal and every record was
  sent; the server then closes. A request whose position is already at or past the end of a
  finished stream answers **204**, which stops an ``EventSource`` for good.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sse_starlette import ServerSentEvent

from ..delegation import children_of
from ..engine import Engine
from ..errors import NotFound
from ..lifecycle import RunState
from ..store.base import Store
from ..store.records import RunRecord
from ..telemetry.audit import AuditRecord
from .models import SEQ_MAX, AuditEntry, AuditRecordEvent, EndEvent, MessageDeltaEvent
from .models_threads import ThreadAuditEvent, ThreadDeletedEvent, ThreadDeltaEvent, TurnEndEvent
from .problems import ProblemError
from .state import ApiState, Waker

INT64_MAX = SEQ_MAX
"""Positions are seqs stored as 64-bit integers; anything larger is refused up front."""

SSE_POLL_SECONDS = 0.5
"""The longest a stream waits before re-reading the store when the event bus says nothing."""

MAX_CURSOR_CHARS = 16_384
_SEQ = re.compile(r"[0-9]{1,19}")

Cursor = dict[str, int]
"""The last seq sent, by run id."""


@dataclass(frozen=True)
class Scope:
    """What one stream covers: a run, or a run and every run below it (``tree``)."""

    run_id: str
    tree: bool = False

    async def runs(self, store: Store) -> list[RunRecord]:
        """The runs of the stream, the streamed run first, then its subtree in creation order.

        Read before their records: a terminal state is audited in the same transaction as
        its record, so a run read terminal has every record in the read that follows."""
        run = await store.get_run(self.run_id)
        if not self.tree:
            return [run]
        children = children_of(await store.list_runs(root_id=run.root_id, limit=100_000))
        found = [run]
        for parent in found:  # grows while it is walked: breadth first
            found.extend(children.get(parent.id, []))
        return [run, *sorted(found[1:], key=lambda r: (r.created_at, r.id))]

    def event_id(self, cursor: Cursor) -> str:
        return format_cursor(self.run_id, cursor) if self.tree else str(cursor[self.run_id])


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "invalid_position", detail)


def _seq(text: str, what: str) -> int:
    if not _SEQ.fullmatch(text) or int(text) > INT64_MAX:
        raise _invalid(f"{what} must be a record seq from 0 to {INT64_MAX}, not {text[:40]!r}")
    return int(text)


def format_cursor(base: str, cursor: Cursor) -> str:
    """The tree cursor of ``cursor`` for a stream opened on ``base`` (see the module doc)."""
    parts = [str(cursor[base])] if base in cursor else []
    for run_id in sorted(r for r in cursor if r != base):
        path = run_id[len(base):] if run_id.startswith(base + ".") else run_id
        parts.append(f"{path}:{cursor[run_id]}")
    return ",".join(parts)


def parse_cursor(base: str, text: str) -> Cursor:
    """Read a tree cursor written by :func:`format_cursor`; 422 when it is not one."""
    cursor: Cursor = {}
    for part in text.split(","):
        path, sep, seq = part.rpartition(":")
        run_id = base if not sep else base + path if path.startswith(".") else path
        if (sep and not path) or run_id in cursor:
            raise _invalid(f"Last-Event-ID {text[:80]!r} is not a tree cursor "
                           "(send back the id of the last event received)")
        cursor[run_id] = _seq(seq, "each position of a tree cursor")
    return cursor


def start_position(scope: Scope, last_event_id: str | None, after: int | None) -> Cursor:
    """Where a request resumes: ``Last-Event-ID`` (a reconnect) wins over ``?after=``."""
    if last_event_id:
        if len(last_event_id) > MAX_CURSOR_CHARS:
            raise _invalid(f"Last-Event-ID is longer than {MAX_CURSOR_CHARS} characters")
        if scope.tree:
            return parse_cursor(scope.run_id, last_event_id)
        return {scope.run_id: _seq(last_event_id, "Last-Event-ID")}
    if after is None:
        return {}
    if scope.tree:
        raise _invalid("?after= is a seq of one run; a tree stream resumes from Last-Event-ID "
                       "(the id of the last event received)")
    return {scope.run_id: after}


async def nothing_left(store: Store, scope: Scope, cursor: Cursor) -> bool:
    """True when the stream is finished and ``cursor`` is at or past its end (answer 204).

    Checked before the stream starts, so a bad position is a 422, not a broken stream."""
    runs = await scope.runs(store)
    strangers = set(cursor) - {r.id for r in runs}
    if strangers:
        raise _invalid(f"Last-Event-ID names run {sorted(strangers)[0]}, which is not in "
                       f"this stream (the tree of {scope.run_id})")
    if not all(r.state.terminal for r in runs):
        return False
    for run in runs:
        if await store.list_audit(run.id, after_seq=cursor.get(run.id, 0)):
            return False
    return True


@dataclass
class _Progress:
    done_through: float = 0
    """Every model step up to this seq is complete (its record, or a later one, was sent)."""
    retried: dict[int, int] = field(default_factory=dict)
    """Step → the last attempt a ``model.retry`` record closed."""


@dataclass
class DeltaGate:
    """Which bus deltas a stream may still send: none of a model step (or attempt) whose
    completing record the stream already sent, so a client never sees a piece of a turn
    after the turn itself. Any scope can use it: it only looks at records and deltas."""

    _runs: dict[str, _Progress] = field(default_factory=dict)

    def saw(self, run_id: str, record: AuditRecord) -> None:
        """Note a durable record just sent."""
        progress = self._runs.setdefault(run_id, _Progress())
        data = record.data
        step = data.get("step")
        if record.kind == "state.changed" and data.get("to") in _FINISHED:
            progress.done_through = float("inf")
        if not isinstance(step, int):
            return
        if record.kind in ("model.output", "model.error"):
            progress.done_through = max(progress.done_through, step)
        else:
            progress.done_through = max(progress.done_through, step - 1)
        if record.kind == "model.retry" and isinstance(data.get("attempt"), int):
            progress.retried[step] = max(progress.retried.get(step, 0), data["attempt"])

    def fresh(self, deltas: Iterable[dict[str, Any]],
              shape: type[MessageDeltaEvent] = MessageDeltaEvent) -> Iterator[ServerSentEvent]:
        """The SSE events (no id) of the deltas that still come before their record, in the
        stream's documented ``shape`` (a thread stream's deltas also carry their turn)."""
        for delta in deltas:
            progress = self._runs.get(str(delta.get("run_id")))
            step, attempt = delta.get("step"), delta.get("attempt")
            if not isinstance(step, int) or not isinstance(attempt, int):
                continue
            if progress is not None and (step <= progress.done_through
                                         or attempt <= progress.retried.get(step, 0)):
                continue
            try:  # the documented shape only, whatever else travelled on the bus
                body = shape.model_validate(delta).model_dump(mode="json")
            except ValidationError:
                continue
            for optional in ("text", "tool_call"):
                if body[optional] is None:
                    del body[optional]
            yield ServerSentEvent(data=json.dumps(body, separators=(",", ":")))


_FINISHED = frozenset(str(s) for s in RunState if s.terminal)


async def stream(st: ApiState, scope: Scope, cursor: Cursor) -> AsyncIterator[ServerSentEvent]:
    """Send every record after ``cursor`` exactly once, in seq order per run, then ``end``;
    between them, the deltas the bus brings that are not yet stale (see :class:`DeltaGate`)."""
    position = dict(cursor)
    gate = DeltaGate()
    loop = asyncio.get_running_loop()
    async with Waker(st.engine, scope.run_id, tree=scope.tree, deltas=True) as waker:
        while True:
            for delta in gate.fresh(waker.take_deltas()):
                yield delta
            runs = await scope.runs(st.store)
            for run in runs:
                for record in await st.store.list_audit(run.id,
                                                        after_seq=position.get(run.id, 0)):
                    position[run.id] = record.seq
                    gate.saw(run.id, record)
                    event = AuditRecordEvent(type="audit", run_id=run.id,
                                             record=AuditEntry.of(record))
                    yield ServerSentEvent(data=event.model_dump_json(),
                                          id=scope.event_id(position))
            if all(r.state.terminal for r in runs):
                end = EndEvent(type="end", run_id=scope.run_id, state=runs[0].state,
                               last_event_id=scope.event_id(position) if position else None)
                yield ServerSentEvent(data=end.model_dump_json())
                return
            deadline = loop.time() + SSE_POLL_SECONDS
            while not await waker.wait(max(0.0, deadline - loop.time())):
                for delta in gate.fresh(waker.take_deltas()):  # only deltas came: no read
                    yield delta


# -- thread streams (DESIGN §10) ----------------------------------------------------------------
#
# ``GET /v1/threads/{id}/events`` streams every turn of a thread, in turn order: each turn's
# audit records (``type: audit``, with ``run_id`` and ``turn``; the id is a **thread cursor**
# ``1:14,2:3``, the last seq sent of each turn), the ``message.delta`` events of its model
# (ephemeral, no id, straight from the event bus), and ``turn.end`` (no id) after the last
# record of a turn that finished. A thread is open-ended: the stream does not end when a turn
# does; it stays open with pings for the next turn, and ends after ``thread.deleted`` when the
# thread is deleted (or when the client leaves). A reconnect with Last-Event-ID gets what came
# after it; ``turn.end`` of a turn whose records were all sent before is not repeated (its
# last record, the ``state.changed`` into a terminal state, says the same).

ThreadCursor = dict[int, int]
"""The last seq sent, by turn."""

_TURN_AT = re.compile(r"([0-9]{1,9}):([0-9]{1,19})")
_DELTAS_KEPT = 10_000


def format_thread_cursor(cursor: ThreadCursor) -> str:
    return ",".join(f"{turn}:{seq}" for turn, seq in sorted(cursor.items()))


def parse_thread_cursor(text: str, last_turn: int) -> ThreadCursor:
    """Read a thread cursor; 422 when it is not one, or names a turn the thread lacks."""
    if len(text) > MAX_CURSOR_CHARS:
        raise _invalid(f"Last-Event-ID is longer than {MAX_CURSOR_CHARS} characters")
    cursor: ThreadCursor = {}
    for part in text.split(","):
        match = _TURN_AT.fullmatch(part)
        if match is None or int(match.group(1)) in cursor or int(match.group(1)) < 1:
            raise _invalid(f"Last-Event-ID {text[:80]!r} is not a thread cursor (send back "
                           "the id of the last event received)")
        turn = int(match.group(1))
        if turn > last_turn:
            raise _invalid(f"Last-Event-ID names turn {turn}; the thread has {last_turn}")
        cursor[turn] = _seq(match.group(2), "each position of a thread cursor")
    return cursor


class ThreadWaker(Waker):
    """Wakes a thread stream on any event of its turns' runs (or naming the thread), and
    keeps their ``message.delta`` events to forward. A delta of a run the stream has not
    read yet (a turn that just started) is held, and wakes a read that tells whose it is."""

    def __init__(self, engine: Engine, thread_id: str) -> None:
        super().__init__(engine, "*", tree=True, deltas=True)  # every run's events
        self.thread_id = thread_id
        self.turns: dict[str, int] = {}
        """Run id -> turn, as last read from the store."""
        self._unplaced: deque[dict[str, Any]] = deque(maxlen=_DELTAS_KEPT)

    def _concerns(self, event: dict[str, Any]) -> bool:
        run_id = str(event.get("run_id", ""))
        if event.get("type") == "message.delta" and run_id not in self.turns:
            self._unplaced.append(event)
            self._event.set()  # perhaps a new turn: read the store to place it
            return False
        return run_id in self.turns or event.get("thread_id") == self.thread_id

    def drain(self) -> list[dict[str, Any]]:
        """The deltas of this thread's turns since the last drain, oldest first, each with
        its ``turn``; held ones of runs that are still not this thread's are dropped."""
        held = [e for e in self._unplaced if str(e.get("run_id")) in self.turns]
        self._unplaced.clear()
        return [{**e, "turn": self.turns[str(e["run_id"])]}
                for e in (*held, *self.take_deltas()) if str(e.get("run_id")) in self.turns]


async def thread_stream(st: ApiState, thread_id: str, tenant: str,
                        cursor: ThreadCursor) -> AsyncIterator[ServerSentEvent]:
    """Every record of every turn after ``cursor``, deltas and ``turn.end`` as they come;
    ends with ``thread.deleted``."""
    position = dict(cursor)
    touched: set[int] = set()
    ended: set[int] = set()
    complete: set[int] = set()  # read terminal, then read to the end: nothing more will come
    gate = DeltaGate()
    loop = asyncio.get_running_loop()
    waker = ThreadWaker(st.engine, thread_id)
    async with waker:
        while True:
            try:
                await st.store.get_thread(thread_id, tenant)
            except NotFound:
                gone = ThreadDeletedEvent(type="thread.deleted", thread_id=thread_id)
                yield ServerSentEvent(data=gone.model_dump_json())
                return
            turns = await st.store.list_turns(thread_id)  # read before their records
            waker.turns = {t.id: t.turn or 0 for t in turns}
            for delta in gate.fresh(waker.drain(), ThreadDeltaEvent):
                yield delta
            for run in turns:
                turn = run.turn or 0
                if turn in complete:
                    continue
                for record in await st.store.list_audit(run.id, position.get(turn, 0)):
                    position[turn] = record.seq
                    touched.add(turn)
                    gate.saw(run.id, record)
                    event = ThreadAuditEvent(type="audit", run_id=run.id, turn=turn,
                                             record=AuditEntry.of(record))
                    yield ServerSentEvent(data=event.model_dump_json(),
                                          id=format_thread_cursor(position))
                if run.state.terminal:
                    complete.add(turn)
                if run.state.terminal and turn in touched and turn not in ended:
                    ended.add(turn)
                    end = TurnEndEvent(type="turn.end", run_id=run.id, turn=turn,
                                       state=run.state, answer=run.value,
                                       last_event_id=format_thread_cursor(position))
                    yield ServerSentEvent(data=end.model_dump_json())
            deadline = loop.time() + SSE_POLL_SECONDS
            while not await waker.wait(max(0.0, deadline - loop.time())):
                for delta in gate.fresh(waker.drain(), ThreadDeltaEvent):  # no store read
                    yield delta

"""Committed audit events, handed to observers (metrics) once their transaction commits.

Every change the engine makes is audited in the transaction that makes it (a state change is
a ``state.changed`` record, whoever makes it: runner, API cancel, reaper, approval). So the
one place that sees every change exactly once is the stores' audit append, *after* commit:
a rolled-back or re-run transaction reports nothing. Stores wrap each transaction attempt in
:func:`transaction` and report each append with :func:`written`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar, Token
from types import TracebackType

from .records import AuditEvent

log = logging.getLogger("alpaca.store")

Observer = Callable[[str, Sequence[AuditEvent]], None]

_observers: list[Observer] = []
Batch = list[tuple[str, Sequence[AuditEvent]]]

_pending: ContextVar[Batch | None] = ContextVar("alpaca_pending_audit", default=None)
_held: ContextVar[Batch | None] = ContextVar("alpaca_held_audit", default=None)


def subscribe(observer: Observer) -> Callable[[], None]:
    """Call ``observer(run_id, events)`` after each commit that appended ``events``; returns
    the function that unsubscribes it. Observers must be quick and must not raise."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def transaction() -> _Transaction:
    """Wrap one transaction attempt (its commit included): what it wrote is delivered when
    the block ends normally, and dropped when it raises."""
    return _Transaction()


class _Transaction:
    """``transaction()``: a class, not a ``contextmanager`` generator, since every store
    transaction enters one and the generator machinery cost more than the rest of it."""

    __slots__ = ("_token", "_written")
    _written: Batch
    _token: Token[Batch | None]

    def __enter__(self) -> None:
        self._written = []
        self._token = _pending.set(self._written)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _pending.reset(self._token)
        if kind is not None:
            return  # raised: dropped
        held = _held.get()
        if held is not None:
            held.extend(self._written)
        else:
            deliver(self._written)


@contextmanager
def held() -> Iterator[Batch]:
    """Keep what the transactions in this block commit instead of delivering it: a store
    that commits on a worker thread hands the batch to :func:`deliver` on the event loop,
    where observers expect to run."""
    batch: Batch = []
    token = _held.set(batch)
    try:
        yield batch
    finally:
        _held.reset(token)


def deliver(batch: Batch) -> None:
    """Hand committed appends to every observer (one failing observer is logged, not fatal)."""
    for run_id, events in batch:
        for observer in list(_observers):
            try:
                observer(run_id, events)
            except Exception:
                log.exception("audit observer %r failed", observer)


def written(run_id: str, events: Sequence[AuditEvent]) -> None:
    """Note ``events`` appended to ``run_id``'s chain in the current transaction."""
    pending = _pending.get()
    if pending is not None and events:
        pending.append((run_id, list(events)))


def restart() -> None:
    """The transaction body is being run again (a retried conflict): forget what the aborted
    attempt wrote."""
    pending = _pending.get()
    if pending is not None:
        pending.clear()

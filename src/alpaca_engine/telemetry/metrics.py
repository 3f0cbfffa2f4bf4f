"""Prometheus metrics for the engine: runs by state, step latency, tool health, budgets.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (not the global one), so tests and
several engines in one process never collide on metric names. Run states and budget use are
counted from the audit events each store commits (:mod:`..store.observers`): every change,
wherever it is made (runner, API cancel, reaper, approval), is counted once, by the process
that made it. Counters export no ``_created`` series. Values that live in the store
(runs per state, orphaned runs) are *read at scrape time* through callables, never pushed, so
a restarted process reports the truth at once. Those callables run inside the scrape: they
must be cheap and must not block (an async store should hand in a cached value).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..store import observers
from ..store.records import AuditEvent

__all__ = [
    "BREAKER_STATE_VALUES",
    "BUDGET_RESOURCES",
    "METRICS",
    "STEP_BUCKETS",
    "UNKNOWN_TOOL",
    "Metrics",
]

log = logging.getLogger("alpaca.telemetry")

BREAKER_STATE_VALUES: Mapping[str, int] = {"closed": 0, "half_open": 1, "open": 2}
"""Gauge encoding of breaker states: ordered by severity so ``max()`` alerts make sense."""

BUDGET_RESOURCES = frozenset({"steps", "tool_calls", "input_tokens", "output_tokens", "cost"})
"""Fixed label values: an open set would let a typo create a new series."""

UNKNOWN_TOOL = "_unknown"
"""The ``tool`` label of a call to a tool that does not exist: a model may invent any name."""

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Model steps take seconds to minutes, so the defaults (which stop at 10 s) are too short."""

StateCounts = Callable[[], Mapping[str, int]]
OrphanCount = Callable[[], int]


class _ScrapeTimeCollector(Collector):
    """Reads store-backed gauges when Prometheus scrapes, never from a stale copy."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        # One broken source must not take the whole scrape (and every other metric) down.
        states = self._owner._state_counts
        if states is not None:
            family = GaugeMetricFamily(
                "alpaca_runs_in_state", "Runs currently in each state.", labels=["state"]
            )
            try:
                for state, count in sorted(states().items()):
                    family.add_metric([str(state)], float(count))
            except Exception:
                log.exception("metrics: the runs-by-state source failed; series omitted")
            else:
                yield family
        orphans = self._owner._orphan_count
        if orphans is not None:
            try:
                value = float(orphans())
            except Exception:
                log.exception("metrics: the orphan-count source failed; series omitted")
            else:
                yield GaugeMetricFamily(
                    "alpaca_orphaned_runs",
                    "Runs whose worker lease expired and that no worker has reclaimed yet.",
                    value=value,
                )

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: stops the registry from calling ``collect`` at registration."""
        return []


class Metrics:
    """The engine's metrics, on a private registry; expose them with :meth:`render`."""

    def __init__(
        self,
        orphan_count: OrphanCount | None = None,
        state_counts: StateCounts | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._orphan_count = orphan_count
        self._state_counts = state_counts
        self._breaker_lock = threading.Lock()
        self._breaker_last: dict[str, str] = {}
        reg = self.registry
        self.runs_total = Counter(
            "alpaca_runs",
            "Runs entering each state (terminal states count finished runs).",
            ["state"],
            registry=reg,
        )
        self.step_seconds = Histogram(
            "alpaca_step_duration_seconds",
            "Wall time of one journal step, by step kind.",
            ["kind"],
            buckets=STEP_BUCKETS,
            registry=reg,
        )
        self.tool_errors_total = Counter(
            "alpaca_tool_errors",
            "Tool calls that ended in an error, by error code.",
            ["tool", "code"],
            registry=reg,
        )
        self.retries_total = Counter(
            "alpaca_tool_retries",
            "Tool call attempts beyond the first.",
            ["tool"],
            registry=reg,
        )
        self.breaker_state = Gauge(
            "alpaca_breaker_state",
            "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
            ["tool"],
            registry=reg,
        )
        self.breaker_transitions_total = Counter(
            "alpaca_breaker_transitions",
            "Circuit breaker state changes, by new state.",
            ["tool", "to"],
            registry=reg,
        )
        self.budget_used = Counter(
            "alpaca_budget_used",
            "Budget consumed by runs (steps, tool calls, tokens, cost).",
            ["resource"],
            registry=reg,
        )
        reg.register(_ScrapeTimeCollector(self))
        self._children: dict[tuple[int, str], Any] = {}
        """Label children of the per-step series, by metric and label value: a journaled
        step records several, and prometheus_client's ``labels()`` validates and locks."""

    def _child(self, metric: Counter | Histogram, value: str) -> Any:
        key = (id(metric), value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(value)
        return child

    # ------------------------------------------------------------------ scrape-time sources

    def set_orphan_source(self, orphan_count: OrphanCount | None) -> None:
        """Attach (or detach) the orphan-count source later, e.g. to the module-level METRICS."""
        self._orphan_count = orphan_count

    def set_state_source(self, state_counts: StateCounts | None) -> None:
        """Attach (or detach) the runs-per-state source read at scrape time."""
        self._state_counts = state_counts

    # ------------------------------------------------------------------ recording

    def run_state(self, state: str) -> None:
        """Count a run entering ``state`` (a ``RunState`` works: it is a str)."""
        self._child(self.runs_total, str(state)).inc()

    def observe_step(self, kind: str, seconds: float) -> None:
        """Record how long one step of ``kind`` (model, tool, delegation...) took."""
        self._child(self.step_seconds, str(kind)).observe(seconds)

    @contextmanager
    def time_step(self, kind: str) -> Iterator[None]:
        """Time the block as one step of ``kind``, failed or not (a monotonic clock)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe_step(kind, time.perf_counter() - start)

    def tool_error(self, tool: str, code: str) -> None:
        """Count a failed tool call with the engine's error code; a name that is not a tool
        (``unknown_tool``) is counted under :data:`UNKNOWN_TOOL`, so labels stay bounded."""
        label = UNKNOWN_TOOL if str(code) == "unknown_tool" else tool
        self.tool_errors_total.labels(tool=label, code=str(code)).inc()

    def retry(self, tool: str, count: int = 1) -> None:
        """Count retries (attempts after the first) of ``tool``."""
        self.retries_total.labels(tool=tool).inc(count)

    def breaker(self, tool: str, state: str) -> None:
        """Report ``tool``'s breaker state; a change from the last report counts a transition.

        The first report of a tool only sets the gauge: a breaker starting closed has not
        transitioned.
        """
        key = str(state)
        if key not in BREAKER_STATE_VALUES:
            raise ValueError(f"unknown breaker state {key!r}")
        with self._breaker_lock:
            previous = self._breaker_last.get(tool)
            self._breaker_last[tool] = key
        self.breaker_state.labels(tool=tool).set(BREAKER_STATE_VALUES[key])
        if previous is not None and previous != key:
            self.breaker_transitions_total.labels(tool=tool, to=key).inc()

    def breaker_transition(self, tool: str, to_state: str) -> None:
        """Count an explicit transition (e.g. from a breaker ``Transition``) and set the gauge."""
        key = str(to_state)
        if key not in BREAKER_STATE_VALUES:
            raise ValueError(f"unknown breaker state {key!r}")
        with self._breaker_lock:
            self._breaker_last[tool] = key
        self.breaker_state.labels(tool=tool).set(BREAKER_STATE_VALUES[key])
        self.breaker_transitions_total.labels(tool=tool, to=key).inc()

    def budget(self, resource: str, amount: float = 1) -> None:
        """Add ``amount`` of ``resource`` (one of BUDGET_RESOURCES) to the budget counter."""
        if resource not in BUDGET_RESOURCES:
            raise ValueError(f"unknown budget resource {resource!r}")
        if amount:
            self._child(self.budget_used, resource).inc(amount)

    def committed(self, run_id: str, events: Sequence[AuditEvent]) -> None:
        """Count what committed audit events record (see the module doc):

        * ``run.created`` enters ``queued``; ``state.changed`` enters ``data.to``;
        * ``budget.reserved`` spends its ``steps`` and ``tool_calls`` (never given back) and,
          for a tool call, its ``cost`` (a tool's price is fixed);
        * ``model.output`` spends its tokens and its priced ``cost``.
        """
        spend = self._spend
        for event in events:
            kind, data = event.kind, event.data
            if kind == "budget.reserved":
                spend("steps", data.get("steps"))
                spend("tool_calls", data.get("tool_calls"))
                if data.get("tool_calls"):
                    spend("cost", data.get("cost"))
            elif kind == "model.output":
                usage = data.get("usage") or {}
                spend("input_tokens", usage.get("input_tokens"))
                spend("output_tokens", usage.get("output_tokens"))
                spend("cost", data.get("cost"))
            elif kind == "run.created":
                self.run_state("queued")
            elif kind == "state.changed" and data.get("to"):
                self.run_state(str(data["to"]))

    def _spend(self, resource: str, value: object) -> None:
        """``budget(resource, _number(value))`` for a resource known valid."""
        amount = _number(value)
        if amount:
            self._child(self.budget_used, resource).inc(amount)

    # ------------------------------------------------------------------ exposition

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for a ``/metrics`` endpoint."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


def _number(value: object) -> float:
    # A tuple: isinstance checks it faster than the union int | float.
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


class _WithoutCreated(Collector):
    """The registry without the ``*_created`` series (creation timestamps of each label set:
    noise for Prometheus, which tracks resets itself), without a process-wide switch."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


METRICS = Metrics()
"""Process-wide default; attach store-backed sources with ``set_*_source`` at startup."""
observers.subscribe(METRICS.committed)

"""Prometheus metrics: private registry, exposition, scrape-time gauges, breaker encoding."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.records import AuditEvent
from alpaca_engine.telemetry.metrics import METRICS, UNKNOWN_TOOL, Metrics
from alpaca_engine.tools.breaker import BreakerState

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_counters_and_histogram_render() -> None:
    m = Metrics()
    m.run_state(RunState.RUNNING)
    m.run_state("running")
    m.run_state(RunState.SUCCEEDED)
    m.observe_step("model", 0.7)
    with m.time_step("tool"):
        pass
    m.tool_error("search", "tool_timeout")
    m.retry("search")
    m.retry("search", 2)
    m.budget("input_tokens", 120)
    m.budget("cost", 0.25)
    m.budget("steps")
    m.budget("tool_calls", 0)  # nothing spent: no series

    s = scrape(m)
    assert s[("alpaca_runs_total", (("state", "running"),))] == 2
    assert s[("alpaca_runs_total", (("state", "succeeded"),))] == 1
    assert s[("alpaca_step_duration_seconds_count", (("kind", "model"),))] == 1
    assert s[("alpaca_step_duration_seconds_sum", (("kind", "model"),))] == pytest.approx(0.7)
    assert s[("alpaca_step_duration_seconds_bucket", (("kind", "model"), ("le", "1.0")))] == 1
    assert s[("alpaca_step_duration_seconds_bucket", (("kind", "model"), ("le", "0.5")))] == 0
    assert s[("alpaca_step_duration_seconds_count", (("kind", "tool"),))] == 1
    assert s[("alpaca_tool_errors_total", (("code", "tool_timeout"), ("tool", "search")))] == 1
    assert s[("alpaca_tool_retries_total", (("tool", "search"),))] == 3
    assert s[("alpaca_budget_used_total", (("resource", "input_tokens"),))] == 120
    assert s[("alpaca_budget_used_total", (("resource", "cost"),))] == pytest.approx(0.25)
    assert s[("alpaca_budget_used_total", (("resource", "steps"),))] == 1
    assert ("alpaca_budget_used_total", (("resource", "tool_calls"),)) not in s


def test_committed_audit_events_count_states_and_every_budget_resource() -> None:
    m = Metrics()
    m.committed("run_1", [
        AuditEvent(kind="run.created", data={"agent": "a"}),
        AuditEvent(kind="state.changed", data={"from": "queued", "to": "running"}),
        AuditEvent(kind="budget.reserved", data={"step": 1, "steps": 1.0, "tokens": 900.0,
                                                 "cost": 0.9}),  # a model's estimate
        AuditEvent(kind="model.output", data={"usage": {"input_tokens": 10,
                                                        "output_tokens": 4}, "cost": 0.02}),
        AuditEvent(kind="budget.reserved", data={"step": 2, "steps": 1.0, "tool_calls": 1.0,
                                                 "cost": 0.5}),  # a tool's price
        AuditEvent(kind="state.changed", data={"from": "running", "to": "cancelled"}),
    ])
    s = scrape(m)
    assert {labels[0][1]: v for (name, labels), v in s.items()
            if name == "alpaca_runs_total"} == {"queued": 1, "running": 1, "cancelled": 1}
    used = {labels[0][1]: v for (name, labels), v in s.items()
            if name == "alpaca_budget_used_total"}
    assert used == {"steps": 2, "tool_calls": 1, "input_tokens": 10, "output_tokens": 4,
                    "cost": pytest.approx(0.52)}


def test_an_invented_tool_name_is_one_label_and_no_created_series() -> None:
    m = Metrics()
    for name in ("made_up_1", "made_up_2"):
        m.tool_error(name, "unknown_tool")
    m.tool_error("search", "tool_timeout")
    s = scrape(m)
    assert s[("alpaca_tool_errors_total", (("code", "unknown_tool"), ("tool", UNKNOWN_TOOL)))] == 2
    assert {dict(labels)["tool"] for name, labels in s if name == "alpaca_tool_errors_total"} \
        == {UNKNOWN_TOOL, "search"}
    body = m.render()[0].decode()
    assert "_created" not in body


async def test_only_committed_transactions_reach_observers() -> None:
    from alpaca_engine.errors import LeaseLost
    from alpaca_engine.store import observers
    from alpaca_engine.store.records import RunRecord
    from alpaca_engine.store.sqlite import SQLiteStore

    seen: list[str] = []
    store = SQLiteStore("sqlite:///:memory:")
    await store.open()
    stop = observers.subscribe(lambda run_id, events: seen.extend(e.kind for e in events))
    try:
        await store.create_run(RunRecord(id="r1", tenant="t", agent="a", workflow="w",
                                         input="x", root_id="r1", created_at=0, updated_at=0),
                               [AuditEvent(kind="run.created")])
        claimed = await store.claim_run("r1", "me", 30, 1.0)
        assert claimed is not None
        with pytest.raises(LeaseLost):  # a stale epoch: rolled back, never happened
            await store.transition("r1", RunState.SUCCEEDED, 2.0, epoch=claimed.epoch - 1)
        await store.transition("r1", RunState.SUCCEEDED, 3.0, epoch=claimed.epoch)
    finally:
        stop()
        await store.close()
    assert seen.count("run.created") == 1
    assert seen.count("state.changed") == 2  # queued → running, running → succeeded


def test_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.run_state("failed")
    assert ("alpaca_runs_total", (("state", "failed"),)) in scrape(a)
    assert ("alpaca_runs_total", (("state", "failed"),)) not in scrape(b)
    assert METRICS.registry is not a.registry


def test_orphan_gauge_is_read_at_scrape_time() -> None:
    count = 0
    calls = 0

    def orphans() -> int:
        nonlocal calls
        calls += 1
        return count

    m = Metrics(orphan_count=orphans)
    assert calls == 0  # registering must not evaluate it
    assert scrape(m)[("alpaca_orphaned_runs", ())] == 0
    count = 3
    assert scrape(m)[("alpaca_orphaned_runs", ())] == 3
    assert calls == 2


def test_orphan_and_state_sources_can_be_attached_later() -> None:
    m = Metrics()
    assert ("alpaca_orphaned_runs", ()) not in scrape(m)
    m.set_orphan_source(lambda: 7)
    m.set_state_source(lambda: {RunState.QUEUED: 4, RunState.RUNNING: 1})
    s = scrape(m)
    assert s[("alpaca_orphaned_runs", ())] == 7
    assert s[("alpaca_runs_in_state", (("state", "queued"),))] == 4
    assert s[("alpaca_runs_in_state", (("state", "running"),))] == 1


def test_failing_source_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int:
        raise RuntimeError("store down")

    m = Metrics(orphan_count=broken, state_counts=lambda: {"queued": 1})
    m.run_state("queued")
    with caplog.at_level(logging.ERROR, logger="alpaca.telemetry"):
        s = scrape(m)
    assert ("alpaca_orphaned_runs", ()) not in s
    assert s[("alpaca_runs_in_state", (("state", "queued"),))] == 1
    assert s[("alpaca_runs_total", (("state", "queued"),))] == 1
    assert "orphan-count source failed" in caplog.text


def test_breaker_gauge_values_and_transitions() -> None:
    m = Metrics()
    m.breaker("pay", BreakerState.CLOSED)  # first report: no transition
    s = scrape(m)
    assert s[("alpaca_breaker_state", (("tool", "pay"),))] == 0
    assert not any(name == "alpaca_breaker_transitions_total" for name, _ in s)

    m.breaker("pay", BreakerState.OPEN)
    assert scrape(m)[("alpaca_breaker_state", (("tool", "pay"),))] == 2
    m.breaker("pay", BreakerState.OPEN)  # same state again: not a transition
    m.breaker("pay", "half_open")
    s = scrape(m)
    assert s[("alpaca_breaker_state", (("tool", "pay"),))] == 1
    m.breaker_transition("pay", BreakerState.CLOSED)
    s = scrape(m)
    assert s[("alpaca_breaker_state", (("tool", "pay"),))] == 0
    assert s[("alpaca_breaker_transitions_total", (("to", "open"), ("tool", "pay")))] == 1
    assert s[("alpaca_breaker_transitions_total", (("to", "half_open"), ("tool", "pay")))] == 1
    assert s[("alpaca_breaker_transitions_total", (("to", "closed"), ("tool", "pay")))] == 1
    m.breaker("pay", "closed")  # already reported by breaker_transition: not counted again
    s = scrape(m)
    assert s[("alpaca_breaker_transitions_total", (("to", "closed"), ("tool", "pay")))] == 1


def test_unknown_labels_are_rejected() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="breaker state"):
        m.breaker("pay", "ajar")
    with pytest.raises(ValueError, match="breaker state"):
        m.breaker_transition("pay", "ajar")
    with pytest.raises(ValueError, match="budget resource"):
        m.budget("tokens", 1)


def _old_number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


def old_committed(m: Metrics, events: list[AuditEvent]) -> None:
    """Metrics.committed as it was (before its fast path), through the public methods."""
    for event in events:
        data = event.data
        if event.kind == "run.created":
            m.run_state("queued")
        elif event.kind == "state.changed" and data.get("to"):
            m.run_state(str(data["to"]))
        elif event.kind == "budget.reserved":
            m.budget("steps", _old_number(data.get("steps")))
            m.budget("tool_calls", _old_number(data.get("tool_calls")))
            if data.get("tool_calls"):
                m.budget("cost", _old_number(data.get("cost")))
        elif event.kind == "model.output":
            usage = data.get("usage") or {}
            m.budget("input_tokens", _old_number(usage.get("input_tokens")))
            m.budget("output_tokens", _old_number(usage.get("output_tokens")))
            m.budget("cost", _old_number(data.get("cost")))


class _Ratio(float):
    pass


ODD_VALUES: list[object] = [None, 0, 0.0, -1, -0.5, 1, 2.5, True, False, "3", [1], {"a": 1},
                            10**20, 1e-300, _Ratio(0.75), RunState.RUNNING, float("inf")]


def test_committed_counts_every_odd_value_as_before() -> None:
    events: list[AuditEvent] = []
    for value in ODD_VALUES:
        events += [
            AuditEvent(kind="budget.reserved", data={"steps": value, "tool_calls": value,
                                                     "cost": value}),
            AuditEvent(kind="budget.reserved", data={"steps": value, "tool_calls": 1,
                                                     "cost": value}),
            AuditEvent(kind="budget.reserved", data={"tool_calls": value, "cost": 0.5}),
            AuditEvent(kind="model.output", data={"usage": {"input_tokens": value,
                                                            "output_tokens": value},
                                                  "cost": value}),
            AuditEvent(kind="model.output", data={"usage": value if not value else None,
                                                  "cost": value}),
            AuditEvent(kind="state.changed", data={"to": value}),
            AuditEvent(kind="run.created", data={"to": value}),
            AuditEvent(kind="other", data={"steps": value, "to": value}),
        ]
    events.append(AuditEvent(kind="model.output", data={}))
    new, old = Metrics(), Metrics()
    for start in range(0, len(events), 7):  # several batches, as observers hand them over
        new.committed("run_1", events[start:start + 7])
        old_committed(old, events[start:start + 7])
    assert scrape(new) == scrape(old)
    assert new.render() == old.render()
    fresh = Metrics()  # nothing counted: no series made either
    fresh.committed("run_1", [AuditEvent(kind="budget.reserved", data={"steps": 0})])
    assert scrape(fresh) == scrape(Metrics())


def test_committed_fails_on_malformed_usage_as_before() -> None:
    bad = [AuditEvent(kind="model.output", data={"usage": [1, 2]})]
    with pytest.raises(AttributeError):
        old_committed(Metrics(), bad)
    with pytest.raises(AttributeError):
        Metrics().committed("run_1", bad)


def test_transactions_deliver_on_success_and_drop_on_any_exception() -> None:
    import asyncio

    from alpaca_engine.store import observers

    heard: list[tuple[str, list[str]]] = []
    stop = observers.subscribe(lambda run_id, events: heard.append(
        (run_id, [e.kind for e in events])))
    one = [AuditEvent(kind="a")]
    try:
        with observers.transaction() as entered:
            assert entered is None
            observers.written("r1", one)
            observers.written("r1", [])  # nothing appended: nothing reported
            observers.written("r2", [AuditEvent(kind="b"), AuditEvent(kind="c")])
            assert heard == []  # only once the block ends
        assert heard == [("r1", ["a"]), ("r2", ["b", "c"])]
        for exc in (ValueError("boom"), asyncio.CancelledError(), KeyboardInterrupt()):
            with pytest.raises(type(exc)), observers.transaction():
                observers.written("r3", one)
                raise exc
        with observers.transaction():
            observers.written("r4", one)
            observers.restart()  # a retried attempt forgets the aborted one's writes
            observers.written("r5", one)
        observers.written("r6", one)  # outside any transaction: nowhere to go
        with observers.held() as batch:
            with observers.transaction():
                observers.written("r7", one)
            with pytest.raises(ValueError), observers.transaction():
                observers.written("r8", one)
                raise ValueError
            with observers.transaction(), observers.transaction():  # nested: the inner
                observers.written("r9", one)                        # one's batch, held
        assert [run_id for run_id, _ in batch] == ["r7", "r9"]
        assert [run_id for run_id, _ in heard] == ["r1", "r2", "r5"]
        observers.deliver(batch)
        assert [run_id for run_id, _ in heard] == ["r1", "r2", "r5", "r7", "r9"]
    finally:
        stop()

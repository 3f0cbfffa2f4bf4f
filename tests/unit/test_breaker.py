"""Circuit breaker: every transition, exact thresholds, snapshots, and a random-walk property."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alpaca_engine.clock import FakeClock
from alpaca_engine.tools.breaker import (
    BreakerPolicy,
    BreakerSnapshot,
    BreakerState,
    CircuitBreaker,
    Transition,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(**kw: object) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock(start=1000.0)
    return CircuitBreaker("search", BreakerPolicy(**kw), clock), clock  # type: ignore[arg-type]


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.policy.failure_threshold):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is OPEN


# -- policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_threshold": 0},
        {"failure_rate_threshold": 0.0},
        {"failure_rate_threshold": 1.5},
        {"window_size": 0},
        {"minimum_calls": 0},
        {"window_size": 5, "minimum_calls": 6},
        {"reset_timeout": -1.0},
        {"half_open_max_calls": 0},
    ],
)
def test_policy_rejects_bad_values(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**kw)  # type: ignore[arg-type]


def test_policy_defaults_and_rate_rule_can_be_disabled() -> None:
    p = BreakerPolicy()
    assert (p.failure_threshold, p.failure_rate_threshold, p.window_size) == (5, 0.5, 20)
    assert (p.minimum_calls, p.reset_timeout, p.half_open_max_calls) == (10, 30.0, 1)
    assert BreakerPolicy(failure_rate_threshold=None).failure_rate_threshold is None


# -- closed -> open -----------------------------------------------------------------------------


def test_consecutive_failures_trip_exactly_at_threshold() -> None:
    breaker, clock = make(failure_threshold=3, failure_rate_threshold=None)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.drain_transitions() == []
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.drain_transitions() == [
        Transition("search", CLOSED, OPEN, "3 consecutive failures", clock.now())
    ]


def test_success_resets_consecutive_count() -> None:
    breaker, _ = make(failure_threshold=3, failure_rate_threshold=None)
    for _ in range(5):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.snapshot().consecutive_failures == 0
    breaker.record_failure()
    assert breaker.snapshot().consecutive_failures == 1


def test_failure_rate_trips_only_after_minimum_calls() -> None:
    breaker, clock = make(
        failure_threshold=100, failure_rate_threshold=0.5, window_size=20, minimum_calls=10
    )
    # 9 calls at a 5/9 failure rate: above the threshold but under the minimum.
    for ok in [False, True] * 4 + [False]:
        breaker.record_success() if ok else breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()  # 10th call: 6 failures / 10
    assert breaker.state is OPEN
    [t] = breaker.drain_transitions()
    assert (t.from_state, t.to_state, t.at) == (CLOSED, OPEN, clock.now())
    assert t.reason == "failure rate 0.60 over 10 calls"


def test_failure_rate_below_threshold_stays_closed_and_window_slides() -> None:
    breaker, _ = make(
        failure_threshold=100, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    for ok in [False, True, True, True, True, True]:
        breaker.record_success() if ok else breaker.record_failure()
    assert breaker.state is CLOSED
    assert breaker.snapshot().window == [True, True, True, True]  # oldest calls slid out
    breaker.record_failure()  # window T T T F: 0.25
    assert breaker.state is CLOSED
    breaker.record_failure()  # window T T F F: 0.50 reaches the threshold
    assert breaker.state is OPEN
    assert breaker.drain_transitions()[0].reason == "failure rate 0.50 over 4 calls"


def test_consecutive_rule_wins_when_both_fire() -> None:
    breaker, _ = make(failure_threshold=2, failure_rate_threshold=0.5, minimum_calls=2)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.drain_transitions()[0].reason == "2 consecutive failures"


# -- open ---------------------------------------------------------------------------------------


def test_open_fails_fast_until_reset_timeout() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=30.0)
    trip(breaker)
    breaker.drain_transitions()
    assert breaker.retry_after() == 30.0
    clock.advance(30.0 - 0.001)
    assert not breaker.allow()
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(0.001)
    assert breaker.drain_transitions() == []
    clock.advance(0.002)
    assert breaker.retry_after() == 0.0  # due, but only allow() moves the state
    assert breaker.state is OPEN
    assert breaker.allow()
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() is None
    assert breaker.drain_transitions() == [
        Transition("search", OPEN, HALF_OPEN, "reset timeout elapsed", clock.now())
    ]


def test_open_admits_exactly_at_reset_timeout() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=30.0)
    trip(breaker)
    clock.advance(30.0)
    assert breaker.allow()


def test_results_while_open_are_ignored() -> None:
    breaker, _ = make(failure_threshold=1)
    trip(breaker)
    before = breaker.snapshot()
    breaker.record_success()
    breaker.record_failure()
    breaker.release()
    assert breaker.snapshot() == before
    assert breaker.retry_after() is not None
    assert breaker.state is OPEN


def test_retry_after_is_none_when_closed() -> None:
    breaker, _ = make()
    assert breaker.retry_after() is None


# -- half_open ----------------------------------------------------------------------------------


def test_half_open_admits_exactly_max_calls_probes() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=10.0, half_open_max_calls=3)
    trip(breaker)
    clock.advance(10.0)
    assert [breaker.allow() for _ in range(4)] == [True, True, True, False]
    assert breaker.snapshot().half_open_in_flight == 3


def test_single_probe_success_closes_with_clean_slate() -> None:
    breaker, clock = make(failure_threshold=2, reset_timeout=5.0)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.allow()
    assert not breaker.allow()
    clock.advance(1.0)
    breaker.record_success()
    assert breaker.state is CLOSED
    snap = breaker.snapshot()
    assert (snap.consecutive_failures, snap.window, snap.opened_at) == (0, [], None)
    assert [(t.from_state, t.to_state, t.reason) for t in breaker.drain_transitions()] == [
        (CLOSED, OPEN, "2 consecutive failures"),
        (OPEN, HALF_OPEN, "reset timeout elapsed"),
        (HALF_OPEN, CLOSED, "probe succeeded"),
    ]
    breaker.record_failure()  # one failure after closing must not re-trip
    assert breaker.state is CLOSED


def test_two_probes_needed_to_close_when_max_calls_is_two() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=5.0, half_open_max_calls=2)
    trip(breaker)
    clock.advance(5.0)
    assert breaker.allow()
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is HALF_OPEN
    assert not breaker.allow()  # a settled probe's slot is not handed out again
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.allow()


def test_probe_failure_reopens_and_restarts_timeout() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=10.0, half_open_max_calls=2)
    trip(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    assert breaker.allow()
    breaker.record_success()
    clock.advance(4.0)
    breaker.drain_transitions()
    breaker.record_failure()
    assert breaker.state is OPEN
    reopened_at = clock.now()
    assert breaker.drain_transitions() == [
        Transition("search", HALF_OPEN, OPEN, "probe failed", reopened_at)
    ]
    assert breaker.retry_after() == 10.0
    breaker.record_success()  # the other probe's late result: ignored
    assert breaker.state is OPEN
    clock.advance(9.999)
    assert not breaker.allow()
    clock.advance(0.002)
    assert breaker.allow()
    snap = breaker.snapshot()
    assert (snap.half_open_in_flight, snap.half_open_successes) == (1, 0)


def test_release_frees_a_probe_slot_and_stale_results_are_ignored() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=1.0)
    trip(breaker)
    clock.advance(1.0)
    assert breaker.allow()
    breaker.release()
    assert breaker.snapshot().half_open_in_flight == 0
    breaker.record_failure()  # no probe outstanding: a stale result from before the trip
    breaker.record_success()
    breaker.release()
    assert breaker.state is HALF_OPEN
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED


def test_release_when_closed_is_a_no_op() -> None:
    breaker, _ = make()
    breaker.release()
    assert breaker.snapshot() == BreakerSnapshot()


# -- snapshots ----------------------------------------------------------------------------------


def test_snapshot_round_trip_restores_open_breaker() -> None:
    breaker, clock = make(failure_threshold=2, reset_timeout=10.0)
    trip(breaker)
    data = json.loads(json.dumps(breaker.snapshot().to_dict()))
    assert data["state"] == "open"
    restored = CircuitBreaker("search", breaker.policy, clock, BreakerSnapshot.from_dict(data))
    assert restored.snapshot() == breaker.snapshot()
    assert restored.state is OPEN
    clock.advance(9.0)
    assert not restored.allow()
    assert restored.retry_after() == pytest.approx(1.0)
    clock.advance(1.0)
    assert restored.allow()
    assert not restored.allow()


def test_snapshot_round_trip_keeps_counters_and_window() -> None:
    breaker, clock = make(
        failure_threshold=3, failure_rate_threshold=0.9, window_size=4, minimum_calls=4
    )
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    snap = BreakerSnapshot.from_dict(breaker.snapshot().to_dict())
    assert snap == BreakerSnapshot(CLOSED, 2, [True, False, False], None, 0, 0)
    restored = CircuitBreaker("search", breaker.policy, clock, snap)
    restored.record_failure()  # 3rd consecutive failure carries over
    assert restored.drain_transitions()[0].reason == "3 consecutive failures"


def test_snapshot_round_trip_half_open_keeps_probe_accounting() -> None:
    breaker, clock = make(failure_threshold=1, reset_timeout=1.0, half_open_max_calls=2)
    trip(breaker)
    clock.advance(1.0)
    assert breaker.allow()
    assert breaker.allow()
    breaker.record_success()
    snap = BreakerSnapshot.from_dict(breaker.snapshot().to_dict())
    assert (snap.state, snap.half_open_in_flight, snap.half_open_successes) == (HALF_OPEN, 1, 1)
    restored = CircuitBreaker("search", breaker.policy, clock, snap)
    assert not restored.allow()
    restored.record_success()
    assert restored.state is CLOSED


def test_restoring_a_larger_window_keeps_most_recent_calls() -> None:
    clock = FakeClock()
    snap = BreakerSnapshot(window=[False, False, True, True, True])
    breaker = CircuitBreaker("t", BreakerPolicy(window_size=3, minimum_calls=3), clock, snap)
    assert breaker.snapshot().window == [True, True, True]


@pytest.mark.parametrize(
    "data",
    [
        {"state": "open", "opened_at": None},
        {"state": "closed", "consecutive_failures": -1},
        {"state": "half_open", "half_open_in_flight": -1},
        {"state": "half_open", "half_open_successes": -1},
        {"state": "ajar"},
    ],
)
def test_snapshot_from_dict_rejects_inconsistent_data(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BreakerSnapshot.from_dict(data)


def test_constructor_rejects_open_snapshot_without_opened_at() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("t", BreakerPolicy(), FakeClock(), BreakerSnapshot(state=OPEN))


def test_drain_empties_the_queue() -> None:
    breaker, _ = make(failure_threshold=1)
    trip(breaker)
    assert len(breaker.drain_transitions()) == 1
    assert breaker.drain_transitions() == []


# -- property -----------------------------------------------------------------------------------

policies = st.builds(
    BreakerPolicy,
    failure_threshold=st.integers(1, 4),
    failure_rate_threshold=st.one_of(st.none(), st.floats(0.1, 1.0)),
    window_size=st.just(6),
    minimum_calls=st.integers(1, 6),
    reset_timeout=st.floats(0.0, 20.0),
    half_open_max_calls=st.integers(1, 3),
)
ops = st.lists(
    st.one_of(
        st.just(("allow", 0.0)),
        st.just(("success", 0.0)),
        st.just(("failure", 0.0)),
        st.just(("release", 0.0)),
        st.tuples(st.just("advance"), st.floats(0.0, 15.0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, steps=ops)
def test_never_admits_while_open_nor_too_many_probes(
    policy: BreakerPolicy, steps: list[tuple[str, float]]
) -> None:
    clock = FakeClock(start=0.0)
    breaker = CircuitBreaker("t", policy, clock)
    opened_at: float | None = None  # tracked from the transitions, not the breaker's internals
    probes_admitted = 0  # allow() == True since entering half_open ...
    probes_released = 0  # ... minus slots handed back with release()
    for op, seconds in steps:
        state_before = breaker.state
        in_flight_before = breaker.snapshot().half_open_in_flight
        admitted = False
        if op == "allow":
            admitted = breaker.allow()
            if state_before is OPEN:
                assert opened_at is not None
                if clock.now() - opened_at < policy.reset_timeout:
                    assert not admitted
            assert not (admitted and breaker.state is OPEN)
        elif op == "success":
            breaker.record_success()
        elif op == "failure":
            breaker.record_failure()
        elif op == "release":
            breaker.release()
            if state_before is HALF_OPEN and in_flight_before > 0:
                probes_released += 1
        else:
            clock.advance(seconds)
        for t in breaker.drain_transitions():
            assert t.from_state is not t.to_state
            if t.to_state is OPEN:
                opened_at = t.at
            if t.to_state is HALF_OPEN:
                assert t.from_state is OPEN
                probes_admitted = probes_released = 0
        if admitted and breaker.state is HALF_OPEN:
            probes_admitted += 1
        in_flight = breaker.snapshot().half_open_in_flight
        assert 0 <= in_flight <= policy.half_open_max_calls
        if breaker.state is HALF_OPEN:
            assert probes_admitted - probes_released <= policy.half_open_max_calls
            assert in_flight <= probes_admitted - probes_released
        if breaker.state is OPEN:
            assert breaker.retry_after() is not None
        else:
            assert breaker.retry_after() is None

"""The long-lived processes' collector settings still collect reference cycles."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from alpaca_engine.collector import YOUNG_THRESHOLD, tune_collector


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_cycles_are_still_collected_after_tuning(restored: None) -> None:
    tune_collector()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0  # the start-up heap is out of every collection

    class Node:
        other: object

    assert gc.isenabled()
    gc.collect()  # counts start at zero: the cycle below is young when the next one runs
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    junk = [[i] for i in range(YOUNG_THRESHOLD * 2)]  # allocations alone trigger it
    assert gone() is None
    del junk

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


async def test_the_engine_as_a_library_leaves_the_hosts_collector_alone() -> None:
    import alpaca_engine
    from alpaca_engine import Agent, Engine, ScriptedModel, SQLiteStore, ToolRegistry, Workflow

    assert alpaca_engine.tune_collector is tune_collector  # public, for a host's own server
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    agent = Agent(name="a", model=ScriptedModel(["hi"]))
    workflow = Workflow(ref="t:gc", agents={"a": agent}, tools=ToolRegistry([]))
    store = SQLiteStore("sqlite:///:memory:")
    await store.open()
    try:
        run = await Engine(store, lambda ref: workflow).run(workflow, "a", "hello")
    finally:
        await store.close()
    assert run.output == "hi"
    assert (gc.get_threshold(), gc.get_freeze_count()) == (before, frozen)

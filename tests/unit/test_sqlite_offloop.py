"""A SQLite file locked by another process never stalls the event loop (issue 14 target 2).

The loop's connection never waits for the lock: a unit that finds the file locked runs
again on the writer thread, which waits, while the loop keeps serving. These tests hold the
lock with a second connection (another process would do the same) and check what callers
see: the write waits, everything else goes on, order is kept, and the WAL stays bounded.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from alpaca_engine.lifecycle import RunState
from alpaca_engine.store import observers
from alpaca_engine.store import sqlite as sqlite_module
from alpaca_engine.store.records import AuditEvent
from alpaca_engine.store.sqlite import SQLiteStore
from tests.conformance.store_suite import new_run
from tests.helpers import PATIENCE


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(f"sqlite:///{tmp_path}/alpaca.db")
    await s.open()
    yield s
    await s.close()


@contextmanager
def write_lock(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    """Hold the file's write lock from another connection until the block ends."""
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder
    finally:
        holder.execute("COMMIT")
        holder.close()


async def ticking(ticks: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        ticks.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.01)


async def test_a_write_waits_for_the_lock_while_the_loop_keeps_serving(store: SQLiteStore):
    await store.create_run(new_run("r0"))
    ticks: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(ticking(ticks, stop))
    with write_lock(store):
        creating = asyncio.create_task(store.create_run(new_run("r1")))
        await asyncio.sleep(0.3)
        assert not creating.done()  # it cannot commit while another connection writes
        seen = len(ticks)
        await asyncio.sleep(0.3)
        assert len(ticks) > seen  # ... and the loop was not blocked meanwhile
        assert (await store.get_run("r0")).id == "r0"  # reads do not wait for the lock
    _run, created = await asyncio.wait_for(creating, PATIENCE)
    assert created and (await store.get_run("r1")).state == RunState.QUEUED
    stop.set()
    await ticker


async def test_writes_that_find_the_file_locked_keep_their_order(store: SQLiteStore):
    """A claim issued after a create (both while the file is locked) must find the run: the
    claim queues behind the create instead of overtaking it once the lock is free."""
    with write_lock(store):
        creating = asyncio.create_task(store.create_run(new_run("r1")))
        await asyncio.sleep(0.1)
        claiming = asyncio.create_task(store.claim_run("r1", "w1", 30.0, 200.0))
        renewing = asyncio.create_task(store.renew_lease("r1", "w1", 1, 30.0, 201.0))
        await asyncio.sleep(0.1)
        assert not (creating.done() or claiming.done() or renewing.done())
    await asyncio.wait_for(asyncio.gather(creating, claiming, renewing), PATIENCE)
    claimed = claiming.result()
    assert claimed is not None and claimed.epoch == 1
    run = await store.get_run("r1")
    assert (run.state, run.lease_owner, run.lease_expires_at) == (RunState.RUNNING, "w1", 231.0)
    assert store._offloaded == 0
    assert (await store.create_run(new_run("r2")))[1]


async def test_a_cancelled_caller_does_not_let_later_writes_overtake(store: SQLiteStore):
    """A unit whose caller was cancelled still runs (it may be committing): a write issued
    afterwards, with the file free again, queues behind it instead of running first."""
    gate = threading.Event()
    assert store._pool is not None
    store._pool.submit(gate.wait, PATIENCE)  # the writer thread is busy until the gate opens
    with write_lock(store):
        creating = asyncio.create_task(store.create_run(new_run("r1")))
        await asyncio.sleep(0.1)  # it found the file locked: queued on the thread
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating
    # the file is free, the cancelled create has not run yet: the claim must not go first
    claiming = asyncio.create_task(store.claim_run("r1", "w1", 30.0, 200.0))
    await asyncio.sleep(0.1)
    assert not claiming.done()
    gate.set()
    claimed = await asyncio.wait_for(claiming, PATIENCE)
    assert claimed is not None and claimed.epoch == 1  # the create committed, first
    assert store._orphaned == 0
    assert (await store.create_run(new_run("r2")))[1]  # inline again


async def test_the_writer_threads_own_lock_never_moves_the_loops_writes_there(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch):
    """Checkpoints hold the write lock on the writer thread for a moment: concurrent writes
    that meet it wait for it without blocking and then run inline, so they do not drift
    onto the thread one after another (only another process's lock sends them there)."""
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 5)
    created = await asyncio.gather(*(store.create_run(new_run(f"r{i}")) for i in range(300)))
    assert all(new for _run, new in created)
    assert store._thread_units == 0
    with write_lock(store):
        creating = asyncio.create_task(store.create_run(new_run("locked")))
        await asyncio.sleep(0.1)
    await asyncio.wait_for(creating, PATIENCE)
    assert store._thread_units == 1


async def test_observers_hear_thread_commits_on_the_loop(store: SQLiteStore):
    heard: list[tuple[str, int]] = []

    def observer(run_id: str, events: Sequence[AuditEvent]) -> None:
        heard.append((run_id, threading.get_ident()))

    unsubscribe = observers.subscribe(observer)
    try:
        with write_lock(store):
            creating = asyncio.create_task(
                store.create_run(new_run("r1"), [AuditEvent(kind="run.created")]))
            await asyncio.sleep(0.1)
        await asyncio.wait_for(creating, PATIENCE)
        await asyncio.sleep(0)  # the delivery is a callback of the thread's completion
    finally:
        unsubscribe()
    assert heard == [("r1", threading.get_ident())]


async def wal_after(path: Path, commits: int) -> int:
    """The WAL's size after ``commits`` back-to-back inline commits and the checkpoints."""
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for i in range(commits):
            await store.create_run(new_run(f"r{i}"))
        # the writer thread runs in order: this no-op ends after the last checkpoint
        await asyncio.get_running_loop().run_in_executor(store._pool, int)
        assert len(await store.list_runs(limit=commits)) == commits
        return os.stat(f"{path}-wal").st_size
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_off_the_loop_and_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Commits on the loop never checkpoint (the writer thread does), and the WAL does not
    keep every commit: it is rewound, whereas without checkpoints it holds them all."""
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 10**9)
    unbounded = await wal_after(tmp_path / "never.db", 2000)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 20)
    bounded = await wal_after(tmp_path / "checkpointed.db", 2000)
    assert bounded < unbounded / 4, (bounded, unbounded)

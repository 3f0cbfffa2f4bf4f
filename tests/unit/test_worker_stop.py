"""A stopping worker does not wait on a dispatch read that ignores its cancellation (a driver
stuck in a blocking read): it warns and stops, with its runs finished or handed back."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from alpaca_engine import worker as worker_module
from alpaca_engine.engine import Engine
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.worker import Worker
from tests.helpers import PATIENCE


class DeafDispatcher:
    """A dispatch stream whose blocking read swallows its first cancellation."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()

    async def dispatch(self, run_id: str) -> None:
        return None

    async def next(self, consumer: str, block_seconds: float) -> tuple[str, str] | None:
        if block_seconds <= 0:
            return None
        self.reading.set()
        with contextlib.suppress(asyncio.CancelledError):  # deaf: keeps "reading"
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)  # the next cancellation (the test's clean-up) ends it
        return None

    async def ack(self, delivery_id: str) -> None:
        return None

    async def reclaim(self, consumer: str, min_idle_seconds: float) -> list[tuple[str, str]]:
        return []


async def test_stop_does_not_wait_on_a_read_that_ignores_cancellation(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(worker_module, "CANCEL_GRACE", 0.2)
    store = SQLiteStore("sqlite:///:memory:")
    await store.open()
    dispatcher = DeafDispatcher()
    try:
        engine = Engine(store, lambda ref: None, dispatcher=dispatcher)  # type: ignore[arg-type,return-value]
        worker = Worker(engine, poll_interval=3600, reap_interval=3600)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(dispatcher.reading.wait(), PATIENCE)
        with caplog.at_level(logging.WARNING, logger="alpaca.worker"):
            worker.stop()
            await asyncio.wait_for(task, PATIENCE)
        assert "did not end within" in caplog.text
    finally:
        for left in asyncio.all_tasks() - {asyncio.current_task()}:
            left.cancel()
            await asyncio.gather(left, return_exceptions=True)
        await store.close()

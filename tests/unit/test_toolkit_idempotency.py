"""IdempotencyLedger: once per key, across tasks, threads and ledger instances."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from alpaca_engine.toolkit import IdempotencyInProgress, IdempotencyLedger
from alpaca_engine.tools.retry import default_is_transient


class Counter:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    async def __call__(self) -> dict[str, object]:
        with self._lock:
            self.calls += 1
            n = self.calls
        await asyncio.sleep(self.delay)
        return {"posted": n, "tags": ["a", "b"]}


async def test_second_call_returns_stored_result(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db")
    fn = Counter()
    first = await ledger.once("k", fn)
    second = await ledger.once("k", fn)
    assert fn.calls == 1
    assert first == second == {"posted": 1, "tags": ["a", "b"]}
    assert ledger.status("k") == "done" and ledger.result("k") == first
    # another instance (another process, a restarted worker) sees the same record
    assert await IdempotencyLedger(tmp_path / "l.db").once("k", fn) == first
    assert await ledger.once("other", fn) == {"posted": 2, "tags": ["a", "b"]}


async def test_failure_is_forgotten_so_a_retry_runs_again(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db")

    async def boom() -> int:
        raise RuntimeError("upstream said no")

    with pytest.raises(RuntimeError):
        await ledger.once("k", boom)
    assert ledger.status("k") is None

    async def ok() -> int:
        return 7

    assert await ledger.once("k", ok) == 7


async def test_cancelled_run_releases_the_key(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ledger.once("k", Counter(delay=5)), 0.2)
    assert ledger.status("k") is None


async def test_concurrent_tasks_run_fn_once(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db")
    fn = Counter(delay=0.2)
    results = await asyncio.gather(*(ledger.once("k", fn) for _ in range(5)))
    assert fn.calls == 1
    assert all(r == results[0] for r in results)


def test_concurrent_threads_with_own_loops_run_fn_once(tmp_path: Path) -> None:
    fn = Counter(delay=0.1)
    results: list[object] = []

    def worker() -> None:
        ledger = IdempotencyLedger(tmp_path / "l.db")  # its own handle, like another process
        results.append(asyncio.run(ledger.once("k", fn)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fn.calls == 1
    assert len(results) == 4 and all(r == results[0] for r in results)


async def test_waiter_gives_up_with_clear_error(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db", wait_timeout=0.2)
    assert ledger._claim("k", "someone-else") == ("claimed", None)
    with pytest.raises(IdempotencyInProgress, match="another caller") as info:
        await ledger.once("k", Counter())
    assert default_is_transient(info.value)
    assert ledger.status("k") == "in_progress"


async def test_stale_claim_of_a_crashed_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    IdempotencyLedger(path)._claim("k", "crashed-worker")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE idempotency SET started_at = started_at - 1000")
    fn = Counter()
    assert await IdempotencyLedger(path, stale_after=300).once("k", fn) == {
        "posted": 1, "tags": ["a", "b"]}
    assert fn.calls == 1


async def test_result_must_be_json(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db")

    async def not_json() -> object:
        return object()

    with pytest.raises(TypeError):
        await ledger.once("k", not_json)
    assert ledger.status("k") is None


async def test_forget_allows_a_deliberate_resend(tmp_path: Path) -> None:
    ledger = IdempotencyLedger(tmp_path / "l.db")
    fn = Counter()
    await ledger.once("k", fn)
    assert ledger.forget("k") is True and ledger.forget("k") is False
    await ledger.once("k", fn)
    assert fn.calls == 2


def test_default_path_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_IDEMPOTENCY_DB", str(tmp_path / "nested" / "x.db"))
    assert IdempotencyLedger.from_env().path == tmp_path / "nested" / "x.db"
    assert (tmp_path / "nested" / "x.db").exists()

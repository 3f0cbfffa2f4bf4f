"""Tool and models for the chaos test (loaded by every worker process from this directory).

``record_effect`` is an external side effect made exactly-once by its idempotency key: every
call first records an *attempt* (one row per execution, whoever runs it), then performs the
effect as ``INSERT ... ON CONFLICT (key) DO NOTHING`` in PostgreSQL, so a re-execution after a
crash, a lease takeover or a stale (paused) worker never duplicates it. Random sleeps before and
after the effect make SIGKILL and SIGSTOP land in the middle of tool steps.

The database is named by ``ALPACA_CHAOS_EFFECTS_URL`` (the test creates both tables). A task
with ``hold=NAME`` makes each effect wait, after its attempt, until the file NAME exists in
the directory ``ALPACA_CHAOS_GATES``: the test decides when, instead of guessing a duration.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.decorator import tool

LABELS = ("reserve", "charge", "notify")
URL_ENV = "ALPACA_CHAOS_EFFECTS_URL"
GATES_ENV = "ALPACA_CHAOS_GATES"
HOLD = re.compile(r"hold=(\w+)")

_pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
_pool_lock = asyncio.Lock()


async def _connections() -> AsyncConnectionPool[AsyncConnection[Any]]:
    """One small pool per worker process (each worker runs one event loop)."""
    global _pool
    async with _pool_lock:
        if _pool is None:
            pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
                os.environ[URL_ENV], min_size=1, max_size=2, kwargs={"autocommit": True},
                open=False)
            await pool.open(wait=True, timeout=30)
            _pool = pool
        return _pool


async def _gate(name: str) -> None:
    gate = Path(os.environ[GATES_ENV]) / name  # a file: the test process opens it
    while True:
        if gate.exists():
            return
        await asyncio.sleep(0.05)


@tool
async def record_effect(label: str, ctx: ToolContext, hold: str = "") -> str:
    """Perform an external side effect once per idempotency key (``hold``: a gate to wait for
    between the attempt and the effect; otherwise a random 10-40 ms)."""
    pool = await _connections()
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO chaos_attempts (key, run_id, step, label, pid, attempt) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (ctx.idempotency_key, ctx.run_id, ctx.step, label, os.getpid(), ctx.attempt))
    # a kill here: an attempt without an effect
    if hold:
        await _gate(hold)
    await asyncio.sleep(random.uniform(0.01, 0.04))
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO chaos_effects (key, run_id, step, label, pid) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
            (ctx.idempotency_key, ctx.run_id, ctx.step, label, os.getpid()))
    await asyncio.sleep(random.uniform(0.01, 0.04))  # a kill here: effect, step not journaled
    return f"{label} done ({ctx.idempotency_key})"


def _done(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages if m.role == "tool")


async def coordinator_model(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    await asyncio.sleep(random.uniform(0.002, 0.01))
    if _done(messages) == 0:
        job = next(m.content for m in messages if m.role == "user")
        return {"tool": "delegate_to_executor", "args": {"task": f"execute {job}"}}
    return f"coordinated: {messages[-1].content}"


async def executor_model(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """Three effects in order; a task with ``hold=NAME`` makes each wait for that gate."""
    await asyncio.sleep(random.uniform(0.002, 0.01))
    done = _done(messages)
    if done < len(LABELS):
        task = next(m.content or "" for m in messages if m.role == "user")
        found = HOLD.search(task)
        args: dict[str, Any] = {"label": LABELS[done]}
        if found:
            args["hold"] = found.group(1)
        return {"tool": "record_effect", "args": args}
    return "executed " + ", ".join(LABELS)

"""The workload definitions and timing loops shared by both sides of the peers bench.

Standard library only: this module is imported by ``engine_side.py`` (the project's
environment) and by ``peer_side.py`` (the peers' own venv). Each side only provides, per
framework, a coroutine that performs one run; the rule the "model" follows, the counting that
proves every run did the same work, the clocks and the memory figures are all here, so no
framework is timed differently from another.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

RESULT_MARK = "@@PEERS-RESULT@@"
"""Prefix of the one stdout line a child prints its result on (frameworks may log to stdout)."""


@dataclass
class Workload:
    """What every framework's model and tool see; one per child process.

    ``tool_turns`` is how many turns ask for a tool call before the final answer; the model
    works out its position from the length of the conversation it is handed (O(1), and
    deterministic on replay), never from a counter of its own.
    """

    tool_turns: int = 0
    latency: float = 0.0
    model_calls: int = 0
    tool_calls: int = 0

    def reset(self, tool_turns: int, latency: float) -> None:
        self.tool_turns = tool_turns
        self.latency = latency
        self.model_calls = 0
        self.tool_calls = 0

    async def model_turn(self, turn: int) -> int | None:
        """The model's decision at ``turn``: the ``x`` to call ``noop`` with, or None to answer.

        Sleeps ``latency`` seconds first (workload B); with no latency it does not touch the
        event loop at all (workload A).
        """
        self.model_calls += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        return turn if turn < self.tool_turns else None

    def tool(self, x: int) -> int:
        """The body of every framework's ``noop(x: int) -> int`` tool."""
        self.tool_calls += 1
        return x


WORK = Workload()

RunOnce = Callable[[int], Awaitable[object]]
"""Performs one complete run (id given) of ``WORK.tool_turns`` turns and a final answer."""


class WrongWork(RuntimeError):
    """A framework's run did not make the model and tool calls the workload asks for."""


def check_counts(label: str, runs: int, tool_turns: int) -> None:
    want_models, want_tools = runs * (tool_turns + 1), runs * tool_turns
    if (WORK.model_calls, WORK.tool_calls) != (want_models, want_tools):
        raise WrongWork(f"{label}: {WORK.model_calls} model calls and {WORK.tool_calls} tool "
                        f"calls, expected {want_models} and {want_tools}")


async def turns_workload(run_once: RunOnce, turns: list[int], turn_budget: int) -> dict[str, Any]:
    """Workload A: sequential runs of n turns; µs per turn for every timed run, keyed by n.

    One untimed warm-up run of at most 10 turns first (imports, schema caches, prepared
    statements). For small n several runs are timed (``turn_budget // n``, at least one), so
    each n gets a comparable number of turns measured.
    """
    WORK.reset(min(10, *turns), 0.0)
    await run_once(0)
    run_id = 1
    per_turn: dict[str, list[float]] = {}
    for n in turns:
        samples: list[float] = []
        for _ in range(max(1, turn_budget // n)):
            WORK.reset(n, 0.0)
            gc.collect()
            t0 = time.perf_counter()
            await run_once(run_id)
            elapsed = time.perf_counter() - t0
            check_counts(f"run of {n} turns", 1, n)
            samples.append(elapsed / n * 1e6)
            run_id += 1
        per_turn[str(n)] = samples
    return {"per_turn_us": per_turn}


def maxrss_mib() -> float:
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def concurrent_pass(run_once: RunOnce, runs: int, tool_turns: int, latency: float,
                          first_id: int, trace: bool) -> tuple[float, float]:
    """``runs`` runs at once; return (wall seconds, tracemalloc peak bytes or 0)."""
    WORK.reset(tool_turns, latency)
    gc.collect()
    if trace:
        tracemalloc.start()
        tracemalloc.reset_peak()
    t0 = time.perf_counter()
    await asyncio.gather(*(run_once(first_id + i) for i in range(runs)))
    wall = time.perf_counter() - t0
    peak = 0.0
    if trace:
        peak = float(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    check_counts(f"{runs} concurrent runs", runs, tool_turns)
    return wall, peak


async def concurrent_workload(run_once: RunOnce, runs: int, model_calls: int, latency: float,
                              trace: bool) -> dict[str, Any]:
    """Workload B: ``runs`` concurrent runs of ``model_calls`` model calls (the last one
    answers) with ``latency`` seconds in each model call.

    An untimed warm-up of 10 runs without latency, a timed pass (RSS high-water mark before
    and after), then, when ``trace``, a second pass under tracemalloc for the peak of
    Python-allocated memory.
    """
    tool_turns = model_calls - 1
    await concurrent_pass(run_once, min(runs, 10), tool_turns, 0.0, 0, trace=False)
    before = maxrss_mib()
    wall, _ = await concurrent_pass(run_once, runs, tool_turns, latency, 100, trace=False)
    after = maxrss_mib()
    out: dict[str, Any] = {"wall_s": wall, "runs": runs, "ideal_s": model_calls * latency,
                           "rss_before_mib": before, "rss_after_mib": after}
    if trace:
        traced_wall, peak = await concurrent_pass(run_once, runs, tool_turns, latency,
                                                  100 + runs, trace=True)
        out.update(traced_wall_s=traced_wall, traced_peak_mib=peak / 2**20,
                   kib_per_run=peak / runs / 1024)
    return out


def child_parser(rows: list[str]) -> argparse.ArgumentParser:
    """The command line every child understands (the driver builds it)."""
    p = argparse.ArgumentParser(description="one row of the peers bench (run by driver.py)")
    p.add_argument("row", choices=rows)
    p.add_argument("--workload", choices=("A", "B"), required=True)
    p.add_argument("--turns", default="10,50,200,1000")
    p.add_argument("--turn-budget", type=int, default=200)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--model-calls", type=int, default=5)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--workdir", required=True, help="a fresh directory for SQLite files")
    p.add_argument("--database-url", default=None,
                   help="a fresh, empty PostgreSQL database for this child (driver drops it)")
    p.add_argument("--sqlite-defaults", action="store_true",
                   help="peers: keep the framework's own SQLite settings")
    p.add_argument("--langgraph-durability", choices=("sync", "async", "exit"), default="sync",
                   help="langgraph-sqlite: when checkpoints are written")
    return p


async def run_workload(args: argparse.Namespace, run_once: RunOnce) -> dict[str, Any]:
    if args.workload == "A":
        turns = [int(t) for t in args.turns.split(",") if t.strip()]
        return await turns_workload(run_once, turns, args.turn_budget)
    return await concurrent_workload(run_once, args.runs, args.model_calls, args.latency,
                                     trace=not args.no_trace)


def emit(result: dict[str, Any]) -> None:
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)

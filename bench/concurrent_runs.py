"""Many concurrent runs on one event loop with simulated model latency.

Each run is: model turn (``await asyncio.sleep(latency)``) -> one trivial async tool call ->
model turn (sleep again) -> final answer, i.e. 3 journaled steps; with ``--turns N``, N model
turns and N-1 tool calls (``--turns 5``: the issue's "1,000 concurrent 5-turn runs").
``--runs`` runs are started at once with ``asyncio.gather`` over ``engine.run(...)`` on a
single Engine and a single store. The ideal wall time is turns x latency (100 ms with the
defaults); everything above that is engine, store and event-loop overhead (the SQLite store's
calls run on the loop thread). The timed pass also reports this process's CPU time and the
part of it spent in the garbage collector (``gc.callbacks``), by generation: with many runs in
flight the pass is CPU-bound, and the collector's share says how much of that is walking live
objects. ``--tune-collector`` applies ``alpaca_engine.tune_collector()`` first, as ``alpaca
worker`` and ``alpaca serve`` do; without it the interpreter's defaults stay, as in any
library host.

Per backend, two passes are made on fresh stores:

1. a timed pass (no tracing): wall time, runs/s and the RSS high-water mark
   (``ru_maxrss``) before and after;
2. a traced pass under ``tracemalloc``: the peak of Python-allocated memory during the pass,
   divided by the number of runs. SQLite's own page cache is not allocated through Python
   and so is not traced; the RSS figures include it.

Because ``ru_maxrss`` is a per-process high-water mark, each backend is measured in a fresh
child process by default (``--no-isolate`` runs everything in this process instead).

Run::

    uv run python bench/concurrent_runs.py
    uv run python bench/concurrent_runs.py --runs 2000 --latency 0.02 --json
    uv run python bench/concurrent_runs.py --turns 5 --backend sqlite --tune-collector
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.base import Message, ToolSpec, model_turn_index
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptItem
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

BACKENDS = ("memory", "sqlite")


@tool
async def noop(x: int) -> int:
    """Return the argument unchanged."""
    return x


@dataclass
class Result:
    backend: str
    runs: int
    latency_s: float
    succeeded: int
    wall_s: float
    runs_per_s: float
    ideal_wall_s: float
    overhead_ms_per_run: float
    maxrss_before_mib: float
    maxrss_after_mib: float
    maxrss_delta_mib: float
    traced_peak_mib: float
    traced_kib_per_run: float
    traced_wall_s: float
    turns: int
    cpu_s: float
    """This process's CPU time during the timed pass."""
    gc_s: float
    """Time spent in garbage collections during the timed pass."""
    gc_collections: dict[str, int]
    """Collections during the timed pass, by generation."""
    tuned_collector: bool


class CollectorClock:
    """Time spent in the garbage collector while :attr:`on` (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self.collections: Counter[str] = Counter()
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections[str(info["generation"])] += 1


def make_workflow(latency: float, turns: int = 2) -> Workflow:
    async def model_fn(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> ScriptItem:
        await asyncio.sleep(latency)
        turn = model_turn_index(messages)
        if turn < turns - 1:
            return {"tool": "noop", "args": {"x": turn}}
        return "done"

    agent = Agent(name="worker", model=FunctionModel(model_fn), tools=["noop"],
                  max_steps=turns + 3)
    return Workflow(ref="bench:concurrent_runs", agents={"worker": agent},
                    tools=ToolRegistry([noop]))


def make_store(backend: str, workdir: Path) -> SQLiteStore:
    if backend == "memory":
        return SQLiteStore("sqlite:///:memory:")
    if backend == "sqlite":
        return SQLiteStore(f"sqlite:///{workdir / 'bench.db'}")
    raise ValueError(f"unknown backend {backend!r}")


def maxrss_mib() -> float:
    # Linux reports kilobytes (macOS reports bytes; this bench targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def one_pass(backend: str, runs: int, latency: float, workdir: Path,
                   trace: bool, turns: int = 2,
                   clock: CollectorClock | None = None) -> tuple[float, int, float, float]:
    """Run ``runs`` concurrent runs; return (wall seconds, succeeded, traced peak bytes,
    CPU seconds); ``clock`` times the collector during the pass."""
    store = make_store(backend, workdir)
    await store.open()
    try:
        workflow = make_workflow(latency, turns)
        engine = Engine(store, lambda ref: workflow)
        gc.collect()
        if trace:
            tracemalloc.start()
            tracemalloc.reset_peak()
        if clock is not None:
            clock.on = True
        t0, c0 = time.perf_counter(), time.process_time()
        records = await asyncio.gather(
            *(engine.run(workflow, "worker", f"job {i}") for i in range(runs)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if clock is not None:
            clock.on = False
        peak = 0.0
        if trace:
            _current, peak_bytes = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            peak = float(peak_bytes)
        states = Counter(r.state for r in records)
        if states[RunState.SUCCEEDED] != runs:
            sample = next(r for r in records if r.state != RunState.SUCCEEDED)
            print(f"warning: {backend}: states {dict(states)}; e.g. {sample.error_code} "
                  f"{sample.error_message}", file=sys.stderr)
        return wall, states[RunState.SUCCEEDED], peak, cpu
    finally:
        await store.close()


async def measure(backend: str, runs: int, latency: float, turns: int = 2,
                  tune: bool = False) -> Result:
    if tune:
        from alpaca_engine import tune_collector

        tune_collector()
    clock = CollectorClock()
    gc.callbacks.append(clock)
    try:
        with tempfile.TemporaryDirectory(prefix="alpaca-bench-") as tmp:
            # a tiny warm-up so imports, pydantic schema caches etc. are not in the timed pass
            await one_pass(backend, min(runs, 10), 0.0, Path(tmp) / "warm", trace=False,
                           turns=turns)
            before = maxrss_mib()
            wall, ok, _, cpu = await one_pass(backend, runs, latency, Path(tmp) / "timed",
                                              trace=False, turns=turns, clock=clock)
            after = maxrss_mib()
            traced_wall, _, peak, _ = await one_pass(backend, runs, latency,
                                                     Path(tmp) / "traced", trace=True,
                                                     turns=turns)
    finally:
        gc.callbacks.remove(clock)
    ideal = turns * latency
    return Result(
        backend=backend, runs=runs, latency_s=latency, succeeded=ok,
        wall_s=wall, runs_per_s=runs / wall, ideal_wall_s=ideal,
        overhead_ms_per_run=max(wall - ideal, 0.0) / runs * 1e3,
        maxrss_before_mib=before, maxrss_after_mib=after, maxrss_delta_mib=after - before,
        traced_peak_mib=peak / 2**20, traced_kib_per_run=peak / runs / 1024,
        traced_wall_s=traced_wall, turns=turns, cpu_s=cpu, gc_s=clock.seconds,
        gc_collections=dict(sorted(clock.collections.items())), tuned_collector=tune,
    )


def run_isolated(backend: str, runs: int, latency: float, turns: int = 2,
                 tune: bool = False) -> Result:
    """Measure one backend in a fresh interpreter so ru_maxrss is not shared."""
    cmd = [sys.executable, __file__, "--child", backend, "--runs", str(runs),
           "--latency", str(latency), "--turns", str(turns),
           *(["--tune-collector"] if tune else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} child failed ({proc.returncode}):\n{proc.stderr}")
    if proc.stderr:
        print(proc.stderr, end="", file=sys.stderr)
    return Result(**json.loads(proc.stdout))


def print_table(results: list[Result]) -> None:
    if not results:
        return
    r0 = results[0]
    print(f"concurrent runs: {r0.runs} runs at once, model latency {r0.latency_s * 1e3:.0f} ms "
          f"x {r0.turns} turns + {r0.turns - 1} async tool call(s) each (ideal wall "
          f"{r0.ideal_wall_s * 1e3:.0f} ms); collector: "
          f"{'tune_collector()' if r0.tuned_collector else 'interpreter defaults'}")
    header = (f"{'backend':<8} {'ok':>6} {'wall s':>7} {'x ideal':>7} {'runs/s':>8} "
              f"{'ovh ms/run':>10} {'cpu s':>6} {'gc s':>5} {'gc n (0/1/2)':>12} "
              f"{'RSS before':>10} {'RSS after':>9} {'RSS delta':>9} "
              f"{'traced peak':>11} {'KiB/run':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        n = "/".join(str(r.gc_collections.get(g, 0)) for g in ("0", "1", "2"))
        print(f"{r.backend:<8} {r.succeeded:>6} {r.wall_s:>7.2f} "
              f"{r.wall_s / r.ideal_wall_s:>7.1f} {r.runs_per_s:>8.0f} "
              f"{r.overhead_ms_per_run:>10.2f} {r.cpu_s:>6.2f} {r.gc_s:>5.2f} {n:>12} "
              f"{r.maxrss_before_mib:>8.1f}Mi "
              f"{r.maxrss_after_mib:>7.1f}Mi {r.maxrss_delta_mib:>7.1f}Mi "
              f"{r.traced_peak_mib:>9.1f}Mi {r.traced_kib_per_run:>8.1f}")
    print("cpu = this process's CPU time during the timed pass, gc = the part of it in the "
          "garbage collector (collections by generation);\nRSS = ru_maxrss high-water mark "
          "around the timed pass; traced peak = tracemalloc peak during a second (traced) "
          "pass; KiB/run = traced peak / runs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=1000, help="concurrent runs (default 1000)")
    p.add_argument("--latency", type=float, default=0.05,
                   help="simulated model latency in seconds per turn (default 0.05)")
    p.add_argument("--turns", type=int, default=2,
                   help="model turns per run, a tool call between two (default 2)")
    p.add_argument("--tune-collector", action="store_true",
                   help="apply alpaca_engine.tune_collector() first, as alpaca worker does")
    p.add_argument("--backend", default="memory,sqlite",
                   help="comma-separated: memory,sqlite (default both)")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure all backends in this process (RSS high-water is then shared)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.turns < 1:
        p.error("--turns must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        result = asyncio.run(measure(args.child, args.runs, args.latency, args.turns,
                                     args.tune_collector))
        print(json.dumps(asdict(result)))
        return 0
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            print(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})", file=sys.stderr)
            return 2
    results: list[Result] = []
    for b in backends:
        if args.no_isolate:
            results.append(asyncio.run(measure(b, args.runs, args.latency, args.turns,
                                               args.tune_collector)))
        else:
            results.append(run_isolated(b, args.runs, args.latency, args.turns,
                                        args.tune_collector))
    if args.json:
        out: dict[str, Any] = {
            "benchmark": "concurrent_runs",
            "python": sys.version.split()[0],
            "isolated": not args.no_isolate,
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

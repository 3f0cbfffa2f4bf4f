"""Per-step engine overhead of a long tool loop.

An agent whose ScriptedModel calls a trivial tool ``steps - 1`` times and then answers: with
the default ``--steps 50`` that is 50 model turns and 49 tool calls, i.e. 99 journaled steps.
The model and the tool do no work, so the time measured is the engine's own cost: journaling
(started/finished records with audit entries), the interrupt check before each turn, the
conversation digest, governance checks, argument/output validation and the store round trips.

Each repetition uses a fresh store and a fresh agent; opening the store (schema migrations) and
creating the temp file are outside the timed region. The timed region is one
``await engine.run(...)`` call: submit, claim, the whole loop and the final transition.
The rows are interleaved: each round runs every row once (in an order rotated by one row per
round), and a ratio of two rows is the median of the rounds' ratios, so a machine whose speed
drifts during the bench weighs on both sides of a ratio alike.

``--stream`` adds two rows for the first backend, both with an in-process event bus (as
``alpaca serve`` has): the same scripted model plain, and streaming its turns in pieces of
``--chunk-size`` characters (each piece a redacted ``message.delta`` event through the
Engine's outbox to the bus); the difference is what streaming costs per step.

Run::

    uv run python bench/step_overhead.py
    uv run python bench/step_overhead.py --stream --backend sqlite
    uv run python bench/step_overhead.py --repeat 30 --steps 100 --backend sqlite --json
    uv run python bench/step_overhead.py --postgres-url postgresql://localhost/alpaca
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from alpaca_engine.agents import Agent
from alpaca_engine.coord.local import LocalEventBus
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.scripted import ScriptedModel, ScriptItem
from alpaca_engine.store.base import Store
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.base import Tool
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

BACKENDS = ("memory", "sqlite", "sqlite-full")
"""What --backend takes; --postgres-url adds sqlite-full, postgresql and postgresql-async."""


@tool
async def noop(x: int) -> int:
    """Return the argument unchanged (async: runs on the event loop)."""
    return x


@tool(name="noop")
def noop_sync(x: int) -> int:
    """Return the argument unchanged (sync: runs via asyncio.to_thread)."""
    return x


@dataclass
class Row:
    backend: str
    tool: str
    model: str
    repeat: int
    model_turns: int
    tool_calls: int
    journaled_steps: int
    run_ms_median: float
    run_ms_p90: float
    run_ms_min: float
    us_per_step_median: float
    us_per_step_p90: float
    us_per_step_min: float
    us_per_iteration_median: float
    us_per_iteration_p90: float
    us_per_iteration_min: float
    cpu_us_per_step_median: float
    """Process CPU time per step: less disturbed than wall time by other load."""
    cpu_us_per_step_min: float


@dataclass
class Unavailable:
    backend: str
    reason: str


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class ModelKind:
    """How the looping model answers: ``plain`` (no bus), or with an event bus, plain or
    streaming in pieces of ``chunk_size`` characters."""

    name: str = "plain"
    bus: bool = False
    stream: bool = False
    chunk_size: int = 4


PLAIN = ModelKind()


def make_workflow(steps: int, trivial: Tool, kind: ModelKind = PLAIN) -> Workflow:
    script: list[ScriptItem] = [{"tool": "noop", "args": {"x": i}} for i in range(steps - 1)]
    script.append("done: every one of the tool calls came back with its argument unchanged.")
    model = ScriptedModel(script, stream=kind.stream, chunk_size=kind.chunk_size)
    agent = Agent(name="looper", model=model, tools=["noop"], max_steps=steps + 5)
    return Workflow(ref="bench:step_overhead", agents={"looper": agent},
                    tools=ToolRegistry([trivial]))


StoreFactory = Callable[[Path], Store]


Around = Callable[[], contextlib.AbstractContextManager[Any]]


async def one_run(make: StoreFactory, steps: int, trivial: Tool, workdir: Path,
                  kind: ModelKind = PLAIN,
                  around: Around = contextlib.nullcontext) -> tuple[float, float, int]:
    """Time one run on a fresh store; return (seconds, CPU seconds, journaled steps).
    ``around`` wraps the timed region only (the SQL counters of the counting pass)."""
    store = make(workdir)
    await store.open()
    try:
        workflow = make_workflow(steps, trivial, kind)
        bus = LocalEventBus() if kind.bus else None
        engine = Engine(store, lambda ref: workflow, events=bus)
        gc.collect()
        with around():
            t0, c0 = time.perf_counter(), time.process_time()
            record = await engine.run(workflow, "looper", "loop")
            if engine.outbox is not None:
                await engine.outbox.flush()  # every event handed to the bus, in the timing
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if record.state != RunState.SUCCEEDED:
            raise RuntimeError(f"run ended {record.state}: {record.error_code} "
                               f"{record.error_message}")
        journaled = len(await store.list_steps(record.id))
        return elapsed, cpu, journaled
    finally:
        await store.close()


@dataclass
class Samples:
    """One row's timed repetitions, gathered round by round (see :func:`interleaved`)."""

    name: str
    make: StoreFactory
    trivial: Tool
    tool_kind: str
    kind: ModelKind
    times: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    journaled: int = 0


async def interleaved(plan: list[Samples], steps: int, repeat: int, warmup: int,
                      missing: list[Unavailable]) -> None:
    """``warmup + repeat`` rounds; each round runs every row once, in an order rotated by one
    row per round, so a machine that speeds up or slows down during the bench (this one is
    shared) weighs on every row alike, and a ratio of two rows compares runs made close in
    time. A PostgreSQL row that fails is reported unavailable and leaves the rounds."""
    with tempfile.TemporaryDirectory(prefix="alpaca-bench-") as tmp:
        for i in range(warmup + repeat):
            turn = plan[i % len(plan):] + plan[:i % len(plan)] if plan else []
            for row in turn:
                if row not in plan:
                    continue
                workdir = Path(tmp) / f"{row.name}-{row.tool_kind}-{row.kind.name}-{i}"
                try:
                    elapsed, cpu, row.journaled = await one_run(row.make, steps, row.trivial,
                                                                workdir, row.kind)
                except Exception as exc:
                    if not row.name.startswith("postgresql"):
                        raise
                    missing.append(Unavailable(row.name, f"{type(exc).__name__}: {exc}"))
                    plan.remove(row)
                    continue
                if i >= warmup:
                    row.times.append(elapsed)
                    row.cpus.append(cpu)


def summarize(row: Samples, steps: int) -> Row:
    journaled, times, cpus = row.journaled, row.times, row.cpus
    expected = 2 * steps - 1
    if journaled != expected:
        print(f"warning: {row.name}: expected {expected} journaled steps, found {journaled}",
              file=sys.stderr)
    per_step = [t / journaled * 1e6 for t in times]
    per_iter = [t / steps * 1e6 for t in times]
    return Row(
        backend=row.name, tool=row.tool_kind, model=row.kind.name, repeat=len(times),
        model_turns=steps, tool_calls=steps - 1, journaled_steps=journaled,
        run_ms_median=statistics.median(times) * 1e3,
        run_ms_p90=percentile(times, 90) * 1e3,
        run_ms_min=min(times) * 1e3,
        us_per_step_median=statistics.median(per_step),
        us_per_step_p90=percentile(per_step, 90),
        us_per_step_min=min(per_step),
        us_per_iteration_median=statistics.median(per_iter),
        us_per_iteration_p90=percentile(per_iter, 90),
        us_per_iteration_min=min(per_iter),
        cpu_us_per_step_median=statistics.median(cpus) / journaled * 1e6,
        cpu_us_per_step_min=min(cpus) / journaled * 1e6,
    )


def paired_ratio(plan: list[Samples], over: str, under: str) -> float | None:
    """The median over rounds of (``over``'s run time / ``under``'s, same round): async
    tool rows, plain model. Runs of one round were made back to back."""
    by = {r.name: r.times for r in plan if r.tool_kind == "async" and r.kind == PLAIN}
    a, b = by.get(over), by.get(under)
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=False) if y)


@dataclass
class WireRow:
    """What one PostgreSQL run sent, per journaled step (an untimed pass through a proxy)."""

    backend: str
    journaled_steps: int
    statements: int
    round_trips: int
    statements_per_step: float
    round_trips_per_step: float


async def count_wire(url: str, steps: int) -> WireRow:
    """One run with every statement counted and every round trip seen by a TCP proxy."""
    from pg_wire import RoundTripProxy, WireCount, counting_statements

    count = WireCount()
    async with RoundTripProxy(url, count) as proxy:
        schemas = PostgresSchemas(proxy.url)

        @contextlib.contextmanager
        def counting() -> Any:
            proxy.counting = True
            try:
                with counting_statements(count):
                    yield
            finally:
                proxy.counting = False

        try:
            with tempfile.TemporaryDirectory(prefix="alpaca-bench-") as tmp:
                _, _, journaled = await one_run(schemas, steps, noop, Path(tmp), PLAIN, counting)
        finally:
            await schemas.drop()
    return WireRow("postgresql", journaled, count.statements, count.round_trips,
                   count.statements / journaled, count.round_trips / journaled)


class PostgresSchemas:
    """The PostgreSQL store for each repetition, in a fresh schema of its own (created by the
    store's migrations when it opens, outside the timed region); :meth:`drop` removes them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def __call__(self, _workdir: Path) -> Store:
        from alpaca_engine.store.postgres import PostgresStore

        name = f"alpaca_bench_{uuid.uuid4().hex[:12]}"
        self.created.append(name)
        return PostgresStore(self.url, schema=name)

    async def drop(self) -> None:
        if not self.created:
            return
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            for name in self.created:
                await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(name)))
        self.created.clear()


def store_factory(backend: str, postgres_url: str | None) -> StoreFactory:
    if backend == "memory":
        return lambda _workdir: SQLiteStore("sqlite:///:memory:")
    if backend == "sqlite":
        return lambda workdir: SQLiteStore(f"sqlite:///{workdir / 'bench.db'}")
    if backend == "sqlite-full":
        return lambda workdir: SQLiteStore(f"sqlite:///{workdir / 'bench.db'}?synchronous=full")
    if backend == "postgresql":
        assert postgres_url is not None
        return PostgresSchemas(postgres_url)
    if backend == "postgresql-async":
        assert postgres_url is not None
        return PostgresSchemas(without_commit_sync(postgres_url))
    raise ValueError(f"unknown backend {backend!r}")


def without_commit_sync(url: str) -> str:
    """``url`` with ``synchronous_commit=off`` for its sessions (libpq's ``options``): a
    commit returns before its WAL reaches the disk, as a SQLite WAL file's with
    ``synchronous=NORMAL`` does."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", "-c synchronous_commit=off"))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


async def probe_postgres(url: str) -> str | None:
    """None when a store can be opened for ``url`` (in a throwaway schema, dropped again);
    otherwise the reason."""
    schemas = PostgresSchemas(url)
    try:
        store = schemas(Path("."))
        await store.open()
        await store.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await schemas.drop()
    return None


RATIOS = (
    ("postgresql", "sqlite", "postgresql / sqlite file"),
    ("postgresql", "sqlite-full", "postgresql / sqlite file with synchronous=full (equal "
     "durability: both sync to disk at every commit)"),
    ("postgresql-async", "sqlite", "postgresql with synchronous_commit=off / sqlite file "
     "(equal durability: neither syncs at a commit; a crash loses the last commits, never "
     "what was synced)"),
)
"""The PostgreSQL ratios printed: (row, row it is compared with, label)."""


def print_table(rows: list[Row], missing: list[Unavailable], steps: int,
                wire: WireRow | None = None,
                ratios: dict[str, float | None] | None = None) -> None:
    print(f"step overhead: {steps} model turns + {steps - 1} tool calls per run "
          f"({2 * steps - 1} journaled steps); times are per run")
    header = (f"{'backend':<16} {'tool':<5} {'model':<11} {'n':>3} {'run ms':>8} "
              f"{'us/step med':>11} {'p90':>7} {'min':>7} "
              f"{'us/iter med':>11} {'p90':>7} {'min':>7} {'cpu us/step':>11} {'min':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.backend:<16} {r.tool:<5} {r.model:<11} {r.repeat:>3} "
              f"{r.run_ms_median:>8.1f} "
              f"{r.us_per_step_median:>11.0f} {r.us_per_step_p90:>7.0f} "
              f"{r.us_per_step_min:>7.0f} "
              f"{r.us_per_iteration_median:>11.0f} {r.us_per_iteration_p90:>7.0f} "
              f"{r.us_per_iteration_min:>7.0f} {r.cpu_us_per_step_median:>11.0f} "
              f"{r.cpu_us_per_step_min:>5.0f}")
    for m in missing:
        print(f"{m.backend}: not available ({m.reason})")
    print("us/step = run time / journaled steps; us/iter = run time / model turns "
          "(one iteration = model turn + tool call); cpu = this process's CPU time / step")
    for over, under, label in RATIOS:
        value = (ratios or {}).get(f"{over}/{under}")
        if value is not None:
            print(f"{label}: {value:.2f}x (median of the rounds' ratios)")
    if wire is not None:
        print(f"postgresql wire, one untimed run: {wire.statements} statements, "
              f"{wire.round_trips} round trips for {wire.journaled_steps} steps = "
              f"{wire.statements_per_step:.2f} statements and "
              f"{wire.round_trips_per_step:.2f} round trips per journaled step")


async def main_async(args: argparse.Namespace) -> int:
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            print(f"unknown backend {b!r} (choose from {', '.join(BACKENDS)})", file=sys.stderr)
            return 2
    if args.steps < 2:
        print("--steps must be at least 2", file=sys.stderr)
        return 2
    specs: list[tuple[str, Tool, str, ModelKind]] = [(b, noop, "async", PLAIN)
                                                     for b in backends]
    if args.sync_tool == "all":
        specs += [(b, noop_sync, "sync", PLAIN) for b in backends]
    elif args.sync_tool == "first" and backends:
        specs.append((backends[0], noop_sync, "sync", PLAIN))
    if args.stream and backends:
        specs += [(backends[0], noop, "async", ModelKind("bus", bus=True)),
                  (backends[0], noop, "async", ModelKind("bus+stream", bus=True, stream=True,
                                                         chunk_size=args.chunk_size))]
    missing: list[Unavailable] = []
    if args.postgres_url:
        reason = await probe_postgres(args.postgres_url)
        if reason is None:
            if "sqlite-full" not in backends:  # PostgreSQL's durability, on the SQLite file
                specs.append(("sqlite-full", noop, "async", PLAIN))
            specs.append(("postgresql", noop, "async", PLAIN))
            specs.append(("postgresql-async", noop, "async", PLAIN))
        else:
            missing.append(Unavailable("postgresql", reason))

    plan = [Samples(name, store_factory(name, args.postgres_url), trivial, tool_kind, kind)
            for name, trivial, tool_kind, kind in specs]
    everything = list(plan)
    try:
        await interleaved(plan, args.steps, args.repeat, args.warmup, missing)
    finally:
        for row in everything:
            if isinstance(row.make, PostgresSchemas):
                await row.make.drop()
    rows = [summarize(row, args.steps) for row in plan]
    ratios = {f"{over}/{under}": paired_ratio(plan, over, under)
              for over, under, _ in RATIOS}
    wire: WireRow | None = None
    if args.postgres_url and any(r.name == "postgresql" for r in plan):
        wire = await count_wire(args.postgres_url, args.steps)

    if args.json:
        out: dict[str, Any] = {
            "benchmark": "step_overhead",
            "python": sys.version.split()[0],
            "steps": args.steps, "repeat": args.repeat, "warmup": args.warmup,
            "rows": [asdict(r) for r in rows],
            "unavailable": [asdict(m) for m in missing],
            "postgresql_over_sqlite": ratios["postgresql/sqlite"],
            "postgresql_over_sqlite_full": ratios["postgresql/sqlite-full"],
            "postgresql_async_over_sqlite": ratios["postgresql-async/sqlite"],
            "postgresql_wire": asdict(wire) if wire is not None else None,
        }
        print(json.dumps(out, indent=2))
    else:
        print_table(rows, missing, args.steps, wire, ratios)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--repeat", type=int, default=15, help="timed repetitions (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--steps", type=int, default=50,
                   help="model turns per run; the model calls the tool steps-1 times (default 50)")
    p.add_argument("--backend", default="memory,sqlite",
                   help="comma-separated: memory,sqlite,sqlite-full (default memory,sqlite; "
                        "sqlite-full is the file with ?synchronous=full, added by "
                        "--postgres-url)")
    p.add_argument("--sync-tool", choices=("first", "all", "none"), default="first",
                   help="add sync-tool rows (asyncio.to_thread) for the first backend, "
                        "all backends, or none (default first)")
    p.add_argument("--postgres-url", default=None,
                   help="also measure a PostgresStore on URL (a fresh schema per repetition, "
                        "dropped afterwards)")
    p.add_argument("--stream", action="store_true",
                   help="add rows with an event bus: the model plain, and streaming")
    p.add_argument("--chunk-size", type=int, default=4,
                   help="characters per streamed piece in the streaming row (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

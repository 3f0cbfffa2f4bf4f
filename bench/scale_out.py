"""Scale-out: throughput of 1, 2 and 4 ``alpaca worker`` processes on PostgreSQL + Redis.

Each configuration gets a fresh PostgreSQL database (dropped afterwards) and a flushed private
``redis-server`` (started by this script on a free port, ``--save "" --appendonly no``). The
workers are started and given time to connect; then ``--runs`` runs are submitted at once
through the Python API (``Engine.submit`` with the Redis dispatcher, as ``alpaca run
--submit-only`` does) and the script waits until every run is terminal.

A run is one agent: a ``FunctionModel`` that sleeps ``--latency`` (simulated model latency)
and asks for a trivial tool ``--tools`` times, then answers: with the defaults 4 model turns
+ 3 tool calls = 7 journaled steps, 80 ms of model latency per run.

Reported per worker count:

* **runs/s**: runs / (last finish - first submit), from the store's own timestamps;
* **latency p50/p95**: per run, finish - submit (queueing included: all runs arrive at once,
  so late runs wait behind early ones);
* **service p50/p95**: per run, finish - start of its first step (time actually being run);
* **worker CPU/run**: user+sys CPU of the worker processes during the timed batch / runs
  (PostgreSQL and Redis server CPU not included);
* **pg CPU/run**: CPU of the PostgreSQL backends serving the bench database / runs (server on
  this machine only);
* **redis/run**: commands the Redis server executed during the timed batch / runs (INFO
  commandstats), and **pub/run** the PUBLISH among them (progress events);
* **busy %**: how busy the whole machine was during the timed batch (all cores; Linux), and
  **others %**: the part of that no process of the benchmark accounts for (other load).

Run::

    uv run python bench/scale_out.py
    uv run python bench/scale_out.py --runs 500 --workers 1,2,4,8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from alpaca_engine.coord.factory import make_coordination
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.factory import make_store
from alpaca_engine.workflows.loader import load_workflow, resolve_workflow

WORKFLOW_YAML = """\
version: 1
tools:
  - python: "scale_out_tools:work"
agents:
  - name: bench
    model: {provider: function, function: "scale_out_tools:model"}
    tools: [work]
    limits: {max_steps: 50}
  - name: boss
    model: {provider: function, function: "scale_out_tools:boss_model"}
    delegates_to: [bench]
    limits: {max_steps: 5}
"""

TOOLS_PY = '''\
"""Written by bench/scale_out.py: a trivial tool and a model with simulated latency."""

import asyncio
import os

from alpaca_engine.tools.decorator import tool

LATENCY = float(os.environ.get("ALPACA_BENCH_LATENCY", "0.02"))
TOOLS = int(os.environ.get("ALPACA_BENCH_TOOLS", "3"))


@tool
async def work(i: int) -> int:
    """Return the argument."""
    return i


async def model(messages, tools):
    await asyncio.sleep(LATENCY)
    done = sum(1 for m in messages if m.role == "tool")
    if done < TOOLS:
        return {"tool": "work", "args": {"i": done}}
    return "done"


async def boss_model(messages, tools):
    await asyncio.sleep(LATENCY)
    if not any(m.role == "tool" for m in messages):
        return {"tool": "delegate_to_bench", "args": {"task": "do the work"}}
    return "delegated"
'''

TERMINAL = [str(s) for s in RunState if s.terminal]


@dataclass
class Result:
    workers: int
    concurrency: int
    runs: int
    succeeded: int
    steps_per_run: int
    wall_s: float
    runs_per_s: float
    steps_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    service_ms_p50: float
    service_ms_p95: float
    worker_cpu_ms_per_run: float
    postgres_cpu_ms_per_run: float
    machine_busy_pct: float
    others_busy_pct: float
    redis_commands_per_run: float
    """Commands the Redis server executed during the timed batch / runs (INFO commandstats:
    dispatch, claims, acks, event publishes; from the workers and this script's submits)."""
    redis_publishes_per_run: float
    child_start_ms_p50: float | None = None
    child_start_ms_max: float | None = None
    parent_wake_ms_p50: float | None = None
    parent_wake_ms_max: float | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_client(port: int) -> redis.Redis:
    """A short-lived client of the private server (PING, FLUSHALL, INFO)."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=2)


def redis_calls(port: int) -> dict[str, int]:
    """Calls per command the server has executed since it started (INFO commandstats)."""
    with redis_client(port) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@contextlib.contextmanager
def private_redis(binary: str, workdir: Path) -> Any:
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError), redis_client(port) as client:
                if client.ping():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Any:
    name = f"alpaca_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(admin_url, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds used so far by live processes (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def backend_cpu(admin_url: str, db_url: str) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend serving the bench database (the server
    must run on this machine for /proc to see it; otherwise this is empty)."""
    name = urlsplit(db_url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        pids = [int(r[0]) for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,)).fetchall()]
    return {pid: process_cpu([pid]) for pid in pids if Path(f"/proc/{pid}").exists()}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (Linux /proc/stat)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


def start_workers(count: int, env: dict[str, str], concurrency: int,
                  workdir: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    procs = []
    for n in range(count):
        log = workdir / f"worker-{count}-{n}.log"
        with open(log, "wb") as out:
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "alpaca_engine", "worker", "--concurrency",
                 str(concurrency)], env=env, stdout=out, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + 60
    for proc, log in procs:  # "worker OWNER on URL (Redis)" once the store is open
        while "(Redis)" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
    return procs


def stop_workers(procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, _ in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def wait_terminal(db_url: str, expected: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute("SELECT count(*) FROM runs WHERE state = ANY(%s)",
                                     (TERMINAL,))
            row = await cur.fetchone()
            if row is not None and row[0] >= expected:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {row[0] if row else 0}/{expected} runs terminal")
            await asyncio.sleep(0.05)


async def submit(db_url: str, redis_url: str, workflow_file: Path, runs: int,
                 tag: str) -> list[str]:
    store = make_store(db_url)
    await store.open()
    coord = make_coordination(redis_url)
    try:
        engine = Engine(store, resolve_workflow, dispatcher=coord.dispatcher)
        workflow = load_workflow(workflow_file)
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with sem:
                return (await engine.submit(workflow, "bench", f"{tag}-{i}")).id

        return list(await asyncio.gather(*(one(i) for i in range(runs))))
    finally:
        await coord.close()
        await store.close()


async def wait_run(db_url: str, run_id: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute("SELECT state FROM runs WHERE id = %s", (run_id,))
            row = await cur.fetchone()
            if row is not None and row[0] in TERMINAL:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} not terminal after {seconds} s")
            await asyncio.sleep(0.01)


async def delegation_latency(db_url: str, redis_url: str, workflow_file: Path, runs: int,
                             seconds: float) -> tuple[list[float], list[float]]:
    """``runs`` delegating runs one at a time on idle workers: per run, how long its child
    waited from being queued to its first step, and how long the parent waited from the
    child's finish to its own next step (both in ms, from the store's timestamps)."""
    store = make_store(db_url)
    await store.open()
    coord = make_coordination(redis_url)
    child_start: list[float] = []
    parent_wake: list[float] = []
    try:
        engine = Engine(store, resolve_workflow, dispatcher=coord.dispatcher)
        workflow = load_workflow(workflow_file)
        for i in range(runs):
            parent = await engine.submit(workflow, "boss", f"delegate-{i}")
            await wait_run(db_url, parent.id, seconds)
            [child] = await store.list_runs(parent_id=parent.id)
            child_steps = await store.list_steps(child.id)
            after = [st.started_at for st in await store.list_steps(parent.id)
                     if st.started_at >= child.updated_at]
            child_start.append((min(st.started_at for st in child_steps)
                                - child.created_at) * 1e3)
            parent_wake.append((min(after) - child.updated_at) * 1e3)
    finally:
        await coord.close()
        await store.close()
    return child_start, parent_wake


async def measure(workers: int, args: argparse.Namespace, redis_port: int, redis_pid: int,
                  workdir: Path) -> Result:
    with redis_client(redis_port) as client:
        client.flushall()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    workflow_file = workdir / "workflow.yaml"
    with fresh_database(args.postgres_url) as db_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALPACA_")}
        env.update({"ALPACA_DATABASE_URL": db_url, "ALPACA_REDIS_URL": redis_url,
                    "ALPACA_LEASE_SECONDS": str(args.lease),
                    "ALPACA_POLL_INTERVAL": str(args.poll),
                    "ALPACA_BENCH_LATENCY": str(args.latency),
                    "ALPACA_BENCH_TOOLS": str(args.tools)})
        procs = start_workers(workers, env, args.concurrency, workdir)
        pids = [proc.pid for proc, _ in procs]
        try:
            warm = await submit(db_url, redis_url, workflow_file, args.warmup, "warm")
            await wait_terminal(db_url, len(warm), args.timeout)
            cpu0, (busy0, total0) = process_cpu(pids), machine_cpu()
            ours0 = process_cpu([os.getpid(), redis_pid])
            pg0 = backend_cpu(args.postgres_url, db_url)
            calls0 = redis_calls(redis_port)
            ids = await submit(db_url, redis_url, workflow_file, args.runs, "run")
            await wait_terminal(db_url, len(warm) + len(ids), args.timeout)
            calls1 = redis_calls(redis_port)
            cpu, (busy1, total1) = process_cpu(pids) - cpu0, machine_cpu()
            ours = process_cpu([os.getpid(), redis_pid]) - ours0
            pg1 = backend_cpu(args.postgres_url, db_url)
            # backends that ended during the batch are missed (pools keep theirs open)
            pg_cpu = sum(v - pg0.get(pid, 0.0) for pid, v in pg1.items())
            child_start, parent_wake = await delegation_latency(
                db_url, redis_url, workflow_file, args.delegations, args.timeout)
        finally:
            stop_workers(procs)
        capacity = max(total1 - total0, 1e-9)
        busy = (busy1 - busy0) / capacity
        # what nothing of this benchmark accounts for: other processes on the machine
        others = max(0.0, (busy1 - busy0) - cpu - pg_cpu - ours) / capacity
        with psycopg.connect(db_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT r.id, r.state, r.created_at, r.updated_at, min(s.started_at), count(s.*) "
                "FROM runs r LEFT JOIN steps s ON s.run_id = r.id WHERE r.id = ANY(%s) "
                "GROUP BY r.id", (ids,)).fetchall()
    succeeded = sum(1 for r in rows if r[1] == str(RunState.SUCCEEDED))
    first = min(r[2] for r in rows)
    last = max(r[3] for r in rows)
    wall = last - first
    latency = [(r[3] - r[2]) * 1e3 for r in rows]
    service = [(r[3] - r[4]) * 1e3 for r in rows if r[4] is not None]
    steps = statistics.median(r[5] for r in rows)
    cpu_per_run = cpu / len(ids) * 1e3
    return Result(
        workers=workers, concurrency=args.concurrency, runs=len(ids), succeeded=succeeded,
        steps_per_run=int(steps), wall_s=round(wall, 3), runs_per_s=round(len(ids) / wall, 1),
        steps_per_s=round(len(ids) * steps / wall, 1),
        latency_ms_p50=round(percentile(latency, 50), 1),
        latency_ms_p95=round(percentile(latency, 95), 1),
        service_ms_p50=round(percentile(service, 50), 1),
        service_ms_p95=round(percentile(service, 95), 1),
        worker_cpu_ms_per_run=round(cpu_per_run, 2),
        postgres_cpu_ms_per_run=round(pg_cpu / len(ids) * 1e3, 2),
        machine_busy_pct=round(busy * 100, 1), others_busy_pct=round(others * 100, 1),
        redis_commands_per_run=round(
            sum(n - calls0.get(k, 0) for k, n in calls1.items() if k != "info") / len(ids), 1),
        redis_publishes_per_run=round(
            (calls1.get("publish", 0) - calls0.get("publish", 0)) / len(ids), 1),
        **latency_fields(child_start, parent_wake))


def latency_fields(child_start: list[float], parent_wake: list[float]) -> dict[str, float]:
    if not child_start:
        return {}
    return {"child_start_ms_p50": round(statistics.median(child_start), 1),
            "child_start_ms_max": round(max(child_start), 1),
            "parent_wake_ms_p50": round(statistics.median(parent_wake), 1),
            "parent_wake_ms_max": round(max(parent_wake), 1)}


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    print(f"scale-out: {args.runs} runs at once, {args.tools} tool calls + {args.tools + 1} "
          f"model turns of {args.latency * 1e3:.0f} ms each per run, concurrency "
          f"{args.concurrency} per worker, PostgreSQL + Redis dispatch")
    header = (f"{'workers':>7} {'ok':>5} {'wall s':>7} {'runs/s':>7} {'steps/s':>8} "
              f"{'lat p50':>8} {'p95':>7} {'svc p50':>8} {'p95':>7} {'cpu ms/run':>10} "
              f"{'pg ms/run':>9} {'redis/run':>9} {'pub/run':>7} {'busy %':>6} "
              f"{'others %':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.workers:>7} {r.succeeded:>5} {r.wall_s:>7.2f} {r.runs_per_s:>7.1f} "
              f"{r.steps_per_s:>8.0f} {r.latency_ms_p50:>8.0f} {r.latency_ms_p95:>7.0f} "
              f"{r.service_ms_p50:>8.0f} {r.service_ms_p95:>7.0f} "
              f"{r.worker_cpu_ms_per_run:>10.1f} {r.postgres_cpu_ms_per_run:>9.1f} "
              f"{r.redis_commands_per_run:>9.1f} {r.redis_publishes_per_run:>7.1f} "
              f"{r.machine_busy_pct:>6.0f} {r.others_busy_pct:>8.0f}")
    print("lat = finish - submit (queueing included); svc = finish - first step start; "
          "times in ms;\ncpu ms/run = worker processes' CPU / runs; pg ms/run = CPU of the "
          "PostgreSQL backends serving the bench database / runs;\nredis/run = commands the "
          "Redis server executed / runs (pub/run: of them PUBLISH, the progress events);\n"
          "busy % = whole machine "
          "(all processes, all cores) during the timed batch; others % = the part of it not "
          "used by the workers,\ntheir PostgreSQL backends, Redis or this script (other "
          "load on the machine)")
    for r in results:
        if r.child_start_ms_p50 is not None:
            print(f"delegation, {r.workers} worker(s), {args.delegations} runs one at a time: "
                  f"child queued -> first step p50 {r.child_start_ms_p50:.0f} ms "
                  f"(max {r.child_start_ms_max:.0f}); child finished -> parent's next step "
                  f"p50 {r.parent_wake_ms_p50:.0f} ms (max {r.parent_wake_ms_max:.0f})")


async def main_async(args: argparse.Namespace) -> int:
    binary = args.redis_server or shutil.which("redis-server")
    if binary is None:
        print("redis-server not found (use --redis-server PATH)", file=sys.stderr)
        return 2
    try:
        with psycopg.connect(args.postgres_url, autocommit=True, connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        print(f"PostgreSQL unreachable at {args.postgres_url}: {exc}", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="alpaca-scale-") as tmp:
        workdir = Path(tmp)
        (workdir / "workflow.yaml").write_text(WORKFLOW_YAML)
        (workdir / "scale_out_tools.py").write_text(TOOLS_PY)
        with private_redis(binary, workdir) as (port, redis_pid):
            for n in counts:
                results.append(await measure(n, args, port, redis_pid, workdir))
                if not args.json:
                    print(f"  {n} worker(s): {results[-1].runs_per_s} runs/s", file=sys.stderr)
    if args.json:
        print(json.dumps({"benchmark": "scale_out", "cores": os.cpu_count(),
                          "runs": args.runs, "tools": args.tools, "latency_s": args.latency,
                          "concurrency": args.concurrency,
                          "results": [asdict(r) for r in results]}, indent=2))
    else:
        print_table(results, args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=300, help="timed runs per configuration (300)")
    p.add_argument("--warmup", type=int, default=8, help="untimed runs first (8)")
    p.add_argument("--workers", default="1,2,4", help="worker counts to measure (1,2,4)")
    p.add_argument("--concurrency", type=int, default=8, help="runs per worker at once (8)")
    p.add_argument("--tools", type=int, default=3, help="tool calls per run (3)")
    p.add_argument("--latency", type=float, default=0.02,
                   help="simulated model latency per turn, seconds (0.02)")
    p.add_argument("--lease", type=float, default=30.0, help="ALPACA_LEASE_SECONDS (30)")
    p.add_argument("--poll", type=float, default=0.2, help="ALPACA_POLL_INTERVAL (0.2)")
    p.add_argument("--delegations", type=int, default=10,
                   help="delegating runs, one at a time, to time child dispatch and parent "
                        "wake-up after the batch (10; 0 skips)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="give up on a configuration after this many seconds (600)")
    p.add_argument("--postgres-url", default=os.environ.get(
        "ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="server to create the fresh databases on (its database is only used to connect)")
    p.add_argument("--redis-server", default=None, help="redis-server binary (from PATH)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.runs < 1 or args.tools < 0 or args.latency < 0:
        p.error("--runs must be >= 1, --tools and --latency >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

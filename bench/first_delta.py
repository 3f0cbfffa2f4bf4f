"""Time to first delta: POST /v1/runs → the first ``message.delta`` on the run's SSE stream.

A real ``alpaca serve`` serves a workflow of one agent whose function model streams its
answer (``stream: true``) and waits ``--latency`` seconds before each piece: the model's own
latency to its first chunk. For each of ``--runs`` runs the client POSTs the run, opens
``GET /v1/runs/{id}/events`` at once and notes when the first delta arrives; the figure
reported is that time minus the model's latency, i.e. what the engine adds: the POST, the
dispatch, the claim, journaling the model step ``started``, the delta's redaction and its
trip over the event bus to the SSE response.

Configurations:

* ``sqlite``: ``alpaca serve`` on a SQLite file with its embedded worker; in-process bus;
* ``postgres+redis``: ``alpaca serve --no-worker`` plus one ``alpaca worker`` process, on a
  fresh PostgreSQL database and a private ``redis-server`` (dispatch over Redis Streams,
  deltas over Redis pub/sub from the worker process to the API process).

Run::

    uv run python bench/first_delta.py
    uv run python bench/first_delta.py --runs 50 --latency 0.1 --only sqlite --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from scale_out import free_port, fresh_database, percentile, private_redis

CONFIGS = ("sqlite", "postgres+redis")

MODEL_PY = '''
"""The streamed answer of the first-delta benchmark (the latency is the model's ``delay``)."""


async def answer(messages, tools):
    return "The first words of this answer are the ones being timed, the rest follows."
'''


def workflow_yaml(latency: float) -> str:
    return f"""
version: 1
agents:
  - name: talker
    model: {{provider: function, function: "first_delta_model:answer", stream: true,
            chunk_size: 12, delay: {latency}}}
"""


@dataclass
class Result:
    config: str
    runs: int
    latency_ms: float
    first_delta_ms_median: float
    first_delta_ms_p90: float
    first_delta_ms_min: float
    engine_ms_median: float
    engine_ms_p90: float
    engine_ms_min: float
    run_ms_median: float


def wait_ready(base: str, proc: subprocess.Popen[bytes], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"alpaca serve exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("alpaca serve did not become ready")
        time.sleep(0.1)


@contextlib.contextmanager
def processes(env: dict[str, str], workdir: Path, worker: bool) -> Iterator[str]:
    """``alpaca serve`` (and, with ``worker``, one ``alpaca worker``); yields the base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "alpaca_engine", "serve", "--port", str(port),
             "--workflow", str(workdir / "workflow.yaml")]
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        log = open(workdir / "serve.log", "wb")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(subprocess.Popen([*serve, *(["--no-worker"] if worker else [])], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        wait_ready(base, procs[0])
        if worker:
            log = open(workdir / "worker.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(  # runs name their workflow file: no option
                [sys.executable, "-m", "alpaca_engine", "worker"], env=env, stdout=log,
                stderr=subprocess.STDOUT))
        yield base
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in logs:
            log.close()


async def one_run(client: httpx.AsyncClient) -> tuple[float, float]:
    """(seconds to the first delta, seconds to the stream's end) from the POST."""
    t0 = time.perf_counter()
    r = await client.post("/v1/runs", json={"agent": "talker", "input": "talk"})
    r.raise_for_status()
    run_id = r.json()["id"]
    first: float | None = None
    async with client.stream("GET", f"/v1/runs/{run_id}/events") as stream:
        async for line in stream.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["type"] == "message.delta" and first is None:
                first = time.perf_counter() - t0
            if event["type"] == "end":
                break
    if first is None:
        raise RuntimeError(f"run {run_id}: no delta reached the stream")
    return first, time.perf_counter() - t0


async def measure(config: str, base: str, args: argparse.Namespace) -> Result:
    firsts: list[float] = []
    totals: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for i in range(args.warmup + args.runs):
            first, total = await asyncio.wait_for(one_run(client), 120)
            if i >= args.warmup:
                firsts.append(first * 1e3)
                totals.append(total * 1e3)
    latency = args.latency * 1e3
    engine = [f - latency for f in firsts]
    return Result(config=config, runs=args.runs, latency_ms=latency,
                  first_delta_ms_median=round(statistics.median(firsts), 1),
                  first_delta_ms_p90=round(percentile(firsts, 90), 1),
                  first_delta_ms_min=round(min(firsts), 1),
                  engine_ms_median=round(statistics.median(engine), 1),
                  engine_ms_p90=round(percentile(engine, 90), 1),
                  engine_ms_min=round(min(engine), 1),
                  run_ms_median=round(statistics.median(totals), 1))


async def main_async(args: argparse.Namespace) -> int:
    wanted = [c for c in CONFIGS if args.only in (None, c)]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="alpaca-first-delta-") as tmp:
        workdir = Path(tmp)
        (workdir / "workflow.yaml").write_text(workflow_yaml(args.latency))
        (workdir / "first_delta_model.py").write_text(MODEL_PY)
        base_env = {**os.environ, "ALPACA_POLL_INTERVAL": str(args.poll),
                    "ALPACA_LOG_LEVEL": "WARNING"}
        base_env.pop("ALPACA_REDIS_URL", None)
        if "sqlite" in wanted:
            env = {**base_env, "ALPACA_DATABASE_URL": f"sqlite:///{workdir}/bench.db"}
            with processes(env, workdir, worker=False) as base:
                results.append(await measure("sqlite", base, args))
        if "postgres+redis" in wanted:
            binary = args.redis_server or shutil.which("redis-server")
            if binary is None:
                print("postgres+redis: redis-server not found", file=sys.stderr)
            else:
                with private_redis(binary, workdir) as (port, _pid), \
                        fresh_database(args.postgres_url) as db_url:
                    env = {**base_env, "ALPACA_DATABASE_URL": db_url,
                           "ALPACA_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
                    await asyncio.to_thread(
                        subprocess.run, [sys.executable, "-m", "alpaca_engine", "db",
                                         "upgrade"], env=env, check=True, capture_output=True)
                    with processes(env, workdir, worker=True) as base:
                        results.append(await measure("postgres+redis", base, args))
    if args.json:
        out: dict[str, Any] = {"benchmark": "first_delta", "latency_s": args.latency,
                               "runs": args.runs, "results": [asdict(r) for r in results]}
        print(json.dumps(out, indent=2))
    else:
        print(f"time to first delta: POST /v1/runs → first message.delta on SSE; the model "
              f"waits {args.latency * 1e3:.0f} ms before its first chunk; {args.runs} runs")
        header = (f"{'config':<15} {'first ms med':>12} {'p90':>7} {'min':>7} "
                  f"{'engine ms med':>13} {'p90':>7} {'min':>7} {'run ms med':>10}")
        print(header)
        print("-" * len(header))
        for r in results:
            print(f"{r.config:<15} {r.first_delta_ms_median:>12.1f} {r.first_delta_ms_p90:>7.1f} "
                  f"{r.first_delta_ms_min:>7.1f} {r.engine_ms_median:>13.1f} "
                  f"{r.engine_ms_p90:>7.1f} {r.engine_ms_min:>7.1f} {r.run_ms_median:>10.1f}")
        print("engine = first delta - the model's latency (what the engine adds)")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=30, help="timed runs per configuration (30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    p.add_argument("--latency", type=float, default=0.2,
                   help="the model's latency before each chunk, seconds (0.2)")
    p.add_argument("--only", choices=CONFIGS, default=None, help="one configuration only")
    p.add_argument("--poll", type=float, default=0.2, help="ALPACA_POLL_INTERVAL (0.2)")
    p.add_argument("--postgres-url", default=os.environ.get(
        "ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="server to create the fresh database on")
    p.add_argument("--redis-server", default=None, help="redis-server binary (from PATH)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.runs < 1 or args.latency < 0:
        p.error("--runs must be >= 1 and --latency >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())

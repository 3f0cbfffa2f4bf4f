"""The engine and its peers on the same two workloads, interleaved in one invocation.

Runs in the project's environment (``uv run``, or through ``bench/peers/run.sh``). The peers
run in ``bench/peers/.venv``, created here on first use from ``requirements.txt``. Every
measurement is a fresh child process (engine: ``engine_side.py``; peers: ``peer_side.py``);
within a repetition every row runs once, one after the other, so load on the machine falls
on all rows alike.

- Workload A, per-turn overhead: one agent, n turns of (model call asking for ``noop``,
  the tool call), then a final answer; µs per turn for each n.
- Workload B, concurrency: ``--runs`` concurrent runs of ``--model-calls`` model calls with
  ``--latency`` seconds each (the last call answers, the others ask for ``noop``): wall time
  against the ideal (model calls x latency) and memory per in-flight run.

Prints per-row tables and the ratios engine/peer (< 1: the engine is faster). Every child
is killed with its process group if it outlives ``--timeout``; every PostgreSQL database
created for a child is dropped when the child ends, whatever happened.

Run::

    bench/peers/run.sh                # the default set, a few minutes
    bench/peers/run.sh --quick        # about a minute: n = 10 and 50, 100 concurrent runs
    bench/peers/run.sh --rows engine-memory,langgraph --workloads A --json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
RESULT_MARK = "@@PEERS-RESULT@@"  # as in common.py (imported by the children only)
DEFAULT_PG = os.environ.get("ALPACA_TEST_POSTGRES_URL",
                            "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Row:
    name: str
    side: str  # "engine" or "peer"
    child_row: str
    counterpart: str | None = None  # the engine row a peer is compared with
    postgres: bool = False
    in_memory: bool = False  # a peer that journals nothing (target 5 compares with these)


ROWS = [
    Row("engine-memory", "engine", "memory"),
    Row("engine-sqlite", "engine", "sqlite"),
    Row("engine-postgresql", "engine", "postgresql", postgres=True),
    Row("langgraph", "peer", "langgraph", "engine-memory", in_memory=True),
    Row("pydantic-ai", "peer", "pydantic-ai", "engine-memory", in_memory=True),
    Row("openai-agents", "peer", "openai-agents", "engine-memory", in_memory=True),
    Row("langgraph-sqlite", "peer", "langgraph-sqlite", "engine-sqlite"),
    Row("dbos-sqlite", "peer", "dbos-sqlite", "engine-sqlite"),
    Row("dbos-postgresql", "peer", "dbos-postgresql", "engine-postgresql", postgres=True),
]
BY_NAME = {r.name: r for r in ROWS}

# Nothing that costs time outside the framework's own work: no tracing exporters, no
# LangSmith, no Agents SDK trace upload, no OTLP endpoints the engine would pick up.
QUIET_ENV = {"LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false",
             "OPENAI_AGENTS_DISABLE_TRACING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
DROPPED_ENV_PREFIXES = ("OTEL_", "LANGSMITH_", "LANGCHAIN_", "LOGFIRE_", "DBOS_")


class Interrupted(BaseException):
    """SIGTERM: unwind through every ``finally`` so children and databases are cleaned up."""


# --- the peers' venv -----------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def direct_pins(requirements: Path) -> list[str]:
    return [ln.strip() for ln in requirements.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith(("#", "-"))]


def ensure_venv(venv: Path, requirements: Path) -> tuple[str | None, list[str]]:
    """Create ``venv`` and install ``requirements`` (with ``constraints.txt`` beside it)
    unless that was already done for these exact files.

    Returns (why no peer can run, or None; the pins that could not be installed). When the
    whole set does not install, each pin is tried alone, so one peer that cannot be had
    does not take the others down; the venv is then re-tried on the next invocation.
    """
    stamp = venv / ".requirements.sha256"
    files = [requirements, requirements.with_name("constraints.txt")]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()
    if venv_python(venv).exists() and stamp.exists() and stamp.read_text() == digest:
        return None, []
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "pip.log"
    print(f"creating {venv} (pip install -r {requirements.name}; log in {log}) ...",
          file=sys.stderr, flush=True)
    with log.open("w") as out:
        def ok(cmd: list[str]) -> bool:
            return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode == 0

        base = shutil.which("python3") or sys.executable
        if not ok([base, "-m", "venv", str(venv)]):
            return f"python3 -m venv {venv} failed (see {log})", []
        pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check",
               "-q"]
        if ok([*pip, "-r", str(requirements)]):
            stamp.write_text(digest)
            return None, []
        return None, [pin for pin in direct_pins(requirements)
                      if not ok([*pip, "-c", str(files[1]), pin])]


# --- PostgreSQL: one fresh database per child ----------------------------------------------

class Databases:
    """Creates a fresh database per child on the ``--postgres-url`` server and drops it (and
    any it created before, on exit) with ``DROP DATABASE ... WITH (FORCE)``."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.live: list[str] = []

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5)

    def probe(self) -> str | None:
        try:
            with self._admin() as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        return None

    def url_for(self, name: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def create(self) -> str:
        from psycopg import sql

        name = f"alpaca_peers_{uuid.uuid4().hex[:12]}"
        self.live.append(name)
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop(self, name: str) -> None:
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        self.live.remove(name)

    def drop_quietly(self, name: str) -> None:
        """Drop ``name``, or warn and keep it listed for :meth:`drop_all` to retry."""
        try:
            self.drop(name)
        except Exception as exc:
            print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)

    def drop_all(self) -> None:
        for name in list(self.live):
            self.drop_quietly(name)


# --- children ------------------------------------------------------------------------------

def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(DROPPED_ENV_PREFIXES) and k != "VIRTUAL_ENV"}
    env.update(QUIET_ENV)
    return env


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_child(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run one child in its own process group; (result, "") or (None, one-line reason)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None, f"timed out after {timeout:.0f} s (raise --timeout)"
    finally:
        kill_group(proc)  # the child is done; take down anything it left in its group
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), ""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    return None, f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"[:300]


@functools.cache
def engine_version() -> str:
    """The engine is measured from this checkout: its commit (``+`` when ``src/`` or
    ``pyproject.toml`` has changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              check=False).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "checkout"
    changed = git("status", "--porcelain", "--", "../../src", "../../pyproject.toml")
    return sha + ("+" if changed else "")


@dataclass
class Plan:
    args: argparse.Namespace
    peers_python: Path
    databases: Databases | None
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)

    def command(self, row: Row, workload: str, turns: list[int], workdir: Path,
                database_url: str | None) -> list[str]:
        a = self.args
        if row.side == "engine":
            head = [sys.executable, str(HERE / "engine_side.py")]
        else:
            head = [str(self.peers_python), str(HERE / "peer_side.py")]
        cmd = [*head, row.child_row, "--workload", workload,
               "--turns", ",".join(map(str, turns)), "--turn-budget", str(a.turn_budget),
               "--runs", str(a.runs), "--model-calls", str(a.model_calls),
               "--latency", str(a.latency), "--workdir", str(workdir)]
        if not a.trace:
            cmd.append("--no-trace")
        if a.sqlite_defaults:
            cmd.append("--sqlite-defaults")
        if row.side == "peer":
            cmd += ["--langgraph-durability", a.langgraph_durability]
        if database_url:
            cmd += ["--database-url", database_url]
        return cmd

    def measure(self, row: Row, workload: str, turns: list[int], label: str) -> None:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="alpaca-peers-") as tmp:
            name = None
            try:
                url = None
                if row.postgres:
                    assert self.databases is not None
                    name = self.databases.create()
                    url = self.databases.url_for(name)
                result, reason = run_child(
                    self.command(row, workload, turns, Path(tmp), url), self.args.timeout)
            except Exception as exc:  # e.g. CREATE DATABASE refused: this row alone fails
                result, reason = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
            finally:
                if name is not None and self.databases is not None:
                    self.databases.drop_quietly(name)
        if result is None:
            self.failed[(row.name, workload)] = reason
            print(f"{label} {row.name}: failed ({reason})", file=sys.stderr, flush=True)
            return
        version = str(result.pop("version", "?"))
        self.versions[row.name] = engine_version() if row.side == "engine" else version
        self.results.setdefault(row.name, {}).setdefault(workload, []).append(result)
        print(f"{label} {row.name}: {time.monotonic() - t0:.1f} s", file=sys.stderr,
              flush=True)


def interleave(plan: Plan, rows: list[Row]) -> None:
    a = plan.args
    turns = a.turn_list
    for rep in range(a.reps):
        # the largest n only in the first --long-reps repetitions (it dominates the time)
        rep_turns = turns if rep < a.long_reps or len(turns) == 1 else turns[:-1]
        # rotate the order each repetition so no row always runs first or last
        order = rows[rep % len(rows):] + rows[:rep % len(rows)] if rows else []
        for workload in a.workload_list:
            if workload == "B" and rep >= a.b_reps:
                continue
            for row in order:
                if (row.name, workload) in plan.failed:
                    continue
                plan.measure(row, workload, rep_turns,
                             f"[rep {rep + 1}/{a.reps}] {workload}")


# --- the report ----------------------------------------------------------------------------

def per_turn(plan: Plan, row: str) -> dict[int, list[float]]:
    samples: dict[int, list[float]] = {}
    for result in plan.results.get(row, {}).get("A", []):
        for n, values in result["per_turn_us"].items():
            samples.setdefault(int(n), []).extend(values)
    return samples


def medians_a(plan: Plan) -> dict[str, dict[int, float]]:
    """Rows that have workload A results: {row: {n: median µs per turn}}."""
    out = {}
    for row in plan.results:
        samples = per_turn(plan, row)
        if samples:
            out[row] = {n: statistics.median(v) for n, v in samples.items()}
    return out


def summary_b(plan: Plan) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row, by_workload in plan.results.items():
        results = by_workload.get("B", [])
        if not results:
            continue
        runs = results[0]["runs"]
        rss_delta = statistics.median(r["rss_after_mib"] - r["rss_before_mib"] for r in results)
        s = {"wall_s": statistics.median(r["wall_s"] for r in results),
             "ideal_s": results[0]["ideal_s"], "runs": runs, "passes": len(results),
             "rss_delta_mib": rss_delta, "rss_kib_per_run": rss_delta * 1024 / runs}
        traced = [r["kib_per_run"] for r in results if "kib_per_run" in r]
        if traced:
            s["traced_kib_per_run"] = statistics.median(traced)
        out[row] = s
    return out


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def table(head: str) -> None:
    print(head)
    print("-" * len(head))


def print_a(plan: Plan, rows: list[Row], med: dict[str, dict[int, float]]) -> None:
    a, ns = plan.args, plan.args.turn_list
    print(f"\nWorkload A: µs per turn (one turn = 1 model call + 1 noop tool call; n turns, "
          f"then a final answer); median of all timed runs over {a.reps} repetition(s), "
          f"n={ns[-1]} in {min(a.long_reps, a.reps)}")
    table(f"{'row':<18} {'version':<10}" + "".join(f"{'n=' + str(n):>9}" for n in ns)
          + f"{'growth':>8}")
    for row in (r for r in rows if r.name in med):
        m = med[row.name]
        growth = m[ns[-1]] / m[ns[0]] if ns[-1] in m and ns[0] in m else None
        print(f"{row.name:<18} {plan.versions.get(row.name, ''):<10}"
              + "".join(f"{fmt(m.get(n)):>9}" for n in ns) + f"{fmt(growth, '.2f'):>7}x")
    print(f"growth = µs per turn at n={ns[-1]} / at n={ns[0]}")
    pairs = [r for r in rows if r.side == "peer" and r.name in med and r.counterpart in med]
    if pairs:
        print("\nratio engine/peer of µs per turn (< 1: the engine is faster)")
        table(f"{'peer':<18} {'vs':<18}" + "".join(f"{'n=' + str(n):>8}" for n in ns))
        for row in pairs:
            eng, peer = med[str(row.counterpart)], med[row.name]
            print(f"{row.name:<18} {row.counterpart:<18}" + "".join(
                f"{fmt(eng[n] / peer[n] if n in eng and n in peer else None, '.2f'):>8}"
                for n in ns))
    engine = med.get("engine-memory", {})
    best = []
    for n in ns:
        peers = [(med[r.name][n], r.name) for r in rows
                 if r.in_memory and n in med.get(r.name, {})]
        if n in engine and peers:
            us, name = min(peers)
            best.append(f"n={n} {engine[n] / us:.2f} ({name})")
    if best:
        print("engine-memory / fastest in-memory peer: " + ", ".join(best))


def print_b(plan: Plan, rows: list[Row], summ: dict[str, dict[str, float]]) -> None:
    a = plan.args
    print(f"\nWorkload B: {a.runs} concurrent runs x {a.model_calls} model calls of "
          f"{a.latency * 1e3:.0f} ms (+ {a.model_calls - 1} noop calls); "
          f"ideal wall {a.model_calls * a.latency:.2f} s")
    table(f"{'row':<18} {'wall s':>8} {'x ideal':>8} {'runs/s':>8} {'RSS +MiB':>9} "
          f"{'KiB/run RSS':>12} {'KiB/run traced':>15} {'engine/peer':>12}")
    for row in (r for r in rows if r.name in summ):
        s = summ[row.name]
        ratio = None
        if row.side == "peer" and row.counterpart in summ:
            ratio = summ[str(row.counterpart)]["wall_s"] / s["wall_s"]
        print(f"{row.name:<18} {s['wall_s']:>8.2f} {s['wall_s'] / s['ideal_s']:>8.1f} "
              f"{s['runs'] / s['wall_s']:>8.0f} {s['rss_delta_mib']:>9.1f} "
              f"{s['rss_kib_per_run']:>12.1f} {fmt(s.get('traced_kib_per_run'), '.1f'):>15}"
              f" {fmt(ratio, '.2f'):>12}")
    print("engine/peer = wall time ratio; KiB/run RSS = growth of the RSS high-water mark "
          "during the timed pass / runs;\ntraced = tracemalloc peak of a second pass / runs "
          "(--trace)")


def print_report(plan: Plan, rows: list[Row]) -> None:
    med = medians_a(plan)
    if med:
        print_a(plan, rows, med)
    summ = summary_b(plan)
    if summ:
        print_b(plan, rows, summ)
    for name, reason in plan.unavailable.items():
        print(f"{name}: not available ({reason})")
    for (name, workload), reason in plan.failed.items():
        print(f"{name}: failed in workload {workload} ({reason})")


def report_json(plan: Plan) -> dict[str, Any]:
    a = plan.args
    return {"benchmark": "peers", "python": sys.version.split()[0],
            "settings": {k: v for k, v in vars(a).items() if k not in ("turn_list",
                                                                         "workload_list")},
            "versions": plan.versions, "per_turn_us_median": {
                row: {str(n): v for n, v in m.items()} for row, m in medians_a(plan).items()},
            "concurrent": summary_b(plan), "raw": plan.results,
            "unavailable": plan.unavailable,
            "failed": [{"row": r, "workload": w, "reason": why}
                       for (r, w), why in plan.failed.items()]}


# --- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="one repetition, n = 10,50, 100 concurrent runs (1-2 minutes)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 2)")
    p.add_argument("--long-reps", type=int, default=1,
                   help="repetitions that include the largest n (default 1)")
    p.add_argument("--b-reps", type=int, default=1,
                   help="repetitions that include workload B (default 1)")
    p.add_argument("--turns", default=None, help="workload A's n values (default 10,50,200,1000)")
    p.add_argument("--turn-budget", type=int, default=None,
                   help="timed turns per n per child: runs of n turns = budget // n, at least "
                        "one (default 100)")
    p.add_argument("--runs", type=int, default=None, help="workload B's runs (default 1000)")
    p.add_argument("--model-calls", type=int, default=5,
                   help="workload B's model calls per run (default 5)")
    p.add_argument("--latency", type=float, default=0.05,
                   help="workload B's model latency in seconds (default 0.05)")
    p.add_argument("--trace", action="store_true",
                   help="workload B: add a tracemalloc pass (slow: doubles to 8x the time)")
    p.add_argument("--workloads", default="A,B", help="A, B or A,B (default)")
    p.add_argument("--rows", default="all",
                   help=f"comma-separated rows (default all): {', '.join(BY_NAME)}")
    p.add_argument("--postgres-url", default=DEFAULT_PG,
                   help="server for the PostgreSQL rows (a fresh database per child, dropped "
                        f"afterwards); default {DEFAULT_PG}")
    p.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL rows")
    p.add_argument("--sqlite-defaults", action="store_true",
                   help="peers keep their own SQLite settings instead of the engine's "
                        "(WAL, synchronous=NORMAL)")
    p.add_argument("--langgraph-durability", choices=("sync", "async", "exit"), default="sync",
                   help="langgraph-sqlite's durability mode (default sync: every checkpoint "
                        "committed before the next step, as the engine's journal)")
    p.add_argument("--venv", default=str(HERE / ".venv"), help="the peers' venv")
    p.add_argument("--timeout", type=float, default=600, help="seconds per child (default 600)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    a = p.parse_args(argv)
    quick = a.quick
    a.reps = a.reps or (1 if quick else 2)
    a.turns = a.turns or ("10,50" if quick else "10,50,200,1000")
    a.turn_budget = a.turn_budget or (50 if quick else 100)
    a.runs = a.runs or (100 if quick else 1000)
    try:
        a.turn_list = sorted({int(t) for t in a.turns.split(",") if t.strip()})
    except ValueError:
        p.error(f"--turns must be comma-separated integers, got {a.turns!r}")
    a.workload_list = [w.strip().upper() for w in a.workloads.split(",") if w.strip()]
    if not a.turn_list or min(a.turn_list) < 1:
        p.error("--turns needs positive integers")
    if not set(a.workload_list) <= {"A", "B"} or not a.workload_list:
        p.error("--workloads takes A, B or A,B")
    if a.model_calls < 2:
        p.error("--model-calls must be at least 2 (a tool turn and the answer)")
    if min(a.reps, a.runs, a.turn_budget) < 1:
        p.error("--reps, --runs and --turn-budget must be at least 1")
    names = list(BY_NAME) if a.rows == "all" else [r.strip() for r in a.rows.split(",")]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    a.row_names = names
    return a


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    def handler(_signum: int, _frame: object) -> None:
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rows = [BY_NAME[n] for n in a.row_names]
    venv = Path(a.venv)
    plan = Plan(a, venv_python(venv), None)
    if any(r.side == "peer" for r in rows):
        reason, not_installed = ensure_venv(venv, HERE / "requirements.txt")
        if reason is None:
            probe, why = run_child([str(plan.peers_python), str(HERE / "peer_side.py"),
                                    "--probe"], 120)
            note = (f"; pip could not install {', '.join(not_installed)}, see "
                    f"{venv / 'pip.log'}") if not_installed else ""
            for r in rows:
                if r.side == "peer":
                    entry = (probe or {}).get(r.child_row, {"reason": why or "not probed"})
                    if "reason" in entry:
                        plan.unavailable[r.name] = entry["reason"] + note
        else:
            plan.unavailable.update({r.name: reason for r in rows if r.side == "peer"})
    if any(r.postgres for r in rows):
        if a.no_postgres:
            plan.unavailable.update({r.name: "--no-postgres" for r in rows if r.postgres})
        else:
            plan.databases = Databases(a.postgres_url)
            reason = plan.databases.probe()
            if reason is not None:
                plan.unavailable.update({r.name: f"PostgreSQL at {a.postgres_url}: {reason}"
                                         for r in rows if r.postgres})
    runnable = [r for r in rows if r.name not in plan.unavailable]
    t0 = time.monotonic()
    try:
        with sigterm_unwinds():
            interleave(plan, runnable)
    except (KeyboardInterrupt, Interrupted):
        print("interrupted: children killed, databases dropped; partial results below",
              file=sys.stderr)
    finally:
        if plan.databases is not None:
            plan.databases.drop_all()
    print(f"total {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if a.json:
        print(json.dumps(report_json(plan), indent=2))
    else:
        print_report(plan, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Chaos: real `alpaca worker` processes on PostgreSQL + Redis, killed, paused and cut off.

Scenario (DESIGN §3, §4, §8): three workers (concurrency 4, 3 s leases) execute a stream of run
trees (a coordinator delegating to an executor that performs three idempotent side effects)
while the test SIGKILLs a random worker every 4-10 finished trees and restarts it, SIGSTOPs one
worker for longer than its lease and then SIGCONTs it (its stale writes must be refused by
fencing), and kills and restarts the Redis server. Then the workers are left alone until every
run is terminal, and the test checks: every run succeeded; every run's journal is numbered 1..n
without gap or duplicate and fully completed; each side effect happened exactly once per
idempotency key (attempts may be more); every audit chain verifies; budget ledgers were debited
once per step; ``alpaca doctor`` finds no orphan.

A second, smaller test SIGTERMs a worker mid-run: it drains (a run that can finish in the
drain window finishes, a longer one is released to the queue, none is left running under its
lease) and another worker completes the rest.

Each test uses a fresh PostgreSQL database (dropped afterwards) and its own ``redis-server``
on a free port (``--save "" --appendonly no``), so it can be killed without disturbing anyone.
Knobs: ``ALPACA_CHAOS_RUNS`` (run trees, default 200; kills go on until all are submitted),
``ALPACA_CHAOS_SEED`` (replay the random choices of a run; the seed is printed).

Nothing here asserts a speed: on a loaded machine every phase simply takes longer. Kills are
paced by finished trees, not seconds (so a slow machine gets as much chaos per run as a fast
one, and every kill is followed by progress); the pause lasts until the paused worker's runs
are taken over; a phase fails only when nothing progresses for ``STALL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis as redis_client
from psycopg import sql

from alpaca_engine.coord.factory import make_coordination
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.base import Store
from alpaca_engine.store.factory import make_store
from alpaca_engine.telemetry.audit import verify_chain
from alpaca_engine.workflows.loader import load_workflow, resolve_workflow
from tests.conftest import service_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

HERE = Path(__file__).parent
WORKFLOW = HERE / "wf" / "workflow.yaml"
PG_URL = os.environ.get("ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUNS = int(os.environ.get("ALPACA_CHAOS_RUNS", "200"))
KILL_EVERY = (4, 10)  # finished run trees between two SIGKILLs (random in this range)
KILL_GAP = 1.5  # and at least these seconds, so a fast machine is not killed non-stop
IN_FLIGHT = 24  # run trees submitted but not finished: a backlog for 3 workers x 4 slots
# A phase fails when no run finishes (or nothing it waits for happens) for this long: generous
# for a loaded 2-core machine, where a worker alone takes seconds to start.
STALL_SECONDS = 240.0
LEASE_SECONDS = 3.0
PAUSE_AT_LEAST = LEASE_SECONDS + 6.0  # longer than a lease plus a reaper interval
AUDIT_KEY = "chaos-audit-key"
TERMINAL = [str(s) for s in RunState if s.terminal]
LABELS = ("reserve", "charge", "notify")
ROOT_SHAPE = [("model", 1), ("delegation", 2), ("model", 3)]
CHILD_SHAPE = [("model", 1), ("tool", 2), ("model", 3), ("tool", 4), ("model", 5), ("tool", 6),
               ("model", 7)]

EFFECT_TABLES = """
CREATE TABLE chaos_attempts (
    id BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, run_id TEXT NOT NULL, step INTEGER NOT NULL,
    label TEXT NOT NULL, pid INTEGER NOT NULL, attempt INTEGER NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
CREATE TABLE chaos_effects (
    key TEXT PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, label TEXT NOT NULL,
    pid INTEGER NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
"""


# -- services --------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh database (the workers' store and the effect tables), dropped afterwards."""
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).strip())
        raise  # unreachable: service_unavailable skips or fails
    name = f"alpaca_chaos_{uuid.uuid4().hex[:10]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(PG_URL, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(EFFECT_TABLES)
        yield url
    finally:
        inspector = _inspectors.pop(url, None)
        if inspector is not None:
            inspector.close()
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        admin.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server the test may kill and restart on the same port."""

    def __init__(self, binary: str, port: int, logdir: Path) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.logdir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + STALL_SECONDS
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        service_unavailable("redis-server", "the binary is not on PATH")
        raise AssertionError("unreachable")
    server = RedisServer(binary, _free_port(), tmp_path)
    try:
        server.start()
    except RuntimeError as exc:
        service_unavailable("redis-server", str(exc))
    try:
        yield server
    finally:
        server.kill()


# -- workers ---------------------------------------------------------------------------------


@dataclass
class Slot:
    proc: subprocess.Popen[bytes]
    log: Path
    started: float


@dataclass
class Workers:
    """`alpaca worker` processes in numbered slots; a killed slot can be refilled."""

    env: dict[str, str]
    logdir: Path
    concurrency: int = 4
    slots: dict[int, Slot] = field(default_factory=dict)
    spawned: int = 0
    exited: list[tuple[int, int | None, Path]] = field(default_factory=list)

    def spawn(self, slot: int) -> Slot:
        self.spawned += 1
        log = self.logdir / f"worker-{slot}-{self.spawned}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "alpaca_engine", "worker",
                 "--concurrency", str(self.concurrency)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.slots[slot] = Slot(proc, log, time.monotonic())
        return self.slots[slot]

    def pid(self, slot: int) -> int:
        return self.slots[slot].proc.pid

    def signal(self, slot: int, sig: signal.Signals) -> None:
        os.kill(self.pid(slot), sig)

    def kill(self, slot: int) -> None:
        s = self.slots[slot]
        s.proc.kill()
        s.proc.wait(10)
        self.exited.append((slot, s.proc.returncode, s.log))

    def alive(self) -> list[int]:
        return [n for n, s in self.slots.items() if s.proc.poll() is None]

    def restart_refused_starts(self) -> None:
        """Refill, as a supervisor would, a slot whose worker was started while Redis was down:
        it refuses to start (one line, exit 1) by design; any other exit stays a failure."""
        for n, s in list(self.slots.items()):
            text = s.log.read_text(errors="replace")
            if s.proc.poll() is not None and "(Redis)" not in text and "cannot connect" in text:
                self.exited.append((n, s.proc.returncode, s.log))
                self.spawn(n)

    def ready(self) -> list[int]:
        """Live workers past start-up (they print their banner once the store is open)."""
        return [n for n in self.alive() if "(Redis)" in self.slots[n].log.read_text(
            errors="replace")]

    def stop_all(self) -> None:
        for s in self.slots.values():
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(signal.SIGCONT)
                s.proc.kill()
                s.proc.wait(10)

    def problems(self) -> list[str]:
        """Error lines in any worker's output (a crashed task, a traceback)."""
        return [f"{p.name}: {line}" for p in sorted(self.logdir.glob("worker-*.log"))
                for line in p.read_text(errors="replace").splitlines()
                if "crashed the worker task" in line or line.startswith("Traceback")]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logdir.glob("worker-*.log")))


def worker_env(db_url: str, redis_url: str, lease: float = LEASE_SECONDS) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALPACA_")}
    env.update({
        "ALPACA_DATABASE_URL": db_url, "ALPACA_REDIS_URL": redis_url,
        "ALPACA_LEASE_SECONDS": str(lease), "ALPACA_WORKER_CONCURRENCY": "4",
        "ALPACA_POLL_INTERVAL": "0.2", "ALPACA_AUDIT_KEY": AUDIT_KEY,
        "ALPACA_CHAOS_EFFECTS_URL": db_url, "COLUMNS": "200",
        # Every SIGKILL counts as a crashed attempt of each run the worker held; with 25
        # kills a run could reach the default crash-loop quarantine (5) by bad luck, and
        # this test is about losing nothing, not about quarantine (test_crash_loop.py).
        "ALPACA_MAX_RUN_ATTEMPTS": "1000",
    })
    return env


def alpaca(*args: str, env: dict[str, str], timeout: float = STALL_SECONDS
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.asynccontextmanager
async def submitter(db_url: str, redis_url: str) -> AsyncIterator[tuple[Engine, Store]]:
    """The test process submits through the Python API, dispatching over the test's Redis."""
    store = make_store(db_url, AUDIT_KEY.encode())
    await store.open()
    coord = make_coordination(redis_url)
    try:
        yield Engine(store, resolve_workflow, dispatcher=coord.dispatcher), store
    finally:
        await coord.close()
        await store.close()


# -- checks ----------------------------------------------------------------------------------


_inspectors: dict[str, psycopg.Connection[tuple[Any, ...]]] = {}


def rows(db_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the test database directly (one autocommit connection per database, reused)."""
    conn = _inspectors.get(db_url)
    if conn is None or conn.closed:
        conn = _inspectors[db_url] = psycopg.connect(db_url, autocommit=True)
    return conn.execute(query, args).fetchall()


def state_counts(db_url: str) -> dict[str, int]:
    return {str(s): int(n) for s, n in rows(db_url, "SELECT state, count(*) FROM runs GROUP BY 1")}


def terminal_runs(db_url: str) -> int:
    return sum(n for s, n in state_counts(db_url).items() if s in TERMINAL)


class Progress:
    """A deadline that moves while work gets done: fails only after ``stall`` seconds in
    which ``measure()`` did not grow (a loaded machine is slow, not stuck)."""

    def __init__(self, measure: Any, stall: float = STALL_SECONDS) -> None:
        self.measure = measure
        self.stall = stall
        self.best = measure()
        self.since = time.monotonic()

    def stalled(self) -> bool:
        value = self.measure()
        if value > self.best:
            self.best, self.since = value, time.monotonic()
        return time.monotonic() - self.since > self.stall


async def wait_all_terminal(db_url: str, expected_runs: int) -> float:
    start = time.monotonic()
    progress = Progress(lambda: terminal_runs(db_url))
    while True:
        counts = state_counts(db_url)
        done = sum(n for s, n in counts.items() if s in TERMINAL)
        if done == sum(counts.values()) == expected_runs:
            return time.monotonic() - start
        if progress.stalled():
            raise AssertionError(f"no run finished for {progress.stall:.0f}s: {counts} "
                                 f"(expected {expected_runs} runs)")
        await asyncio.sleep(0.25)


@dataclass
class Tally:
    runs: int = 0
    steps: int = 0
    effects: int = 0
    attempts: int = 0
    reexecuted_keys: int = 0
    audit_records: int = 0


async def check_everything(db_url: str, store: Store, roots: list[str]) -> Tally:
    """Every run succeeded, journals are complete and gapless, effects happened once per key,
    ledgers were debited once per step, and every audit chain verifies."""
    tally = Tally()
    runs = rows(db_url, "SELECT id, parent_id, root_id, agent, state, output, error_code, "
                        "error_message FROM runs ORDER BY id")
    by_id = {r[0]: r for r in runs}
    bad = [r for r in runs if r[4] != "succeeded"]
    assert not bad, f"{len(bad)} run(s) did not succeed, e.g. {bad[:3]}"
    assert sorted(r[0] for r in runs if r[1] is None) == sorted(roots)
    children = [r for r in runs if r[1] is not None]
    assert sorted(r[1] for r in children) == sorted(roots)  # exactly one child per root
    for child in children:
        assert child[0] == f"{child[1]}.2" and child[3] == "executor", child
        assert child[5] == "executed " + ", ".join(LABELS)
    for root in roots:
        assert by_id[root][5] is not None and "executed reserve, charge, notify" in by_id[root][5]
    tally.runs = len(runs)

    steps: dict[str, list[tuple[int, str, str, str | None]]] = defaultdict(list)
    for run_id, seq, kind, status, key in rows(
            db_url, "SELECT run_id, seq, kind, status, idempotency_key FROM steps "
                    "ORDER BY run_id, seq"):
        steps[run_id].append((int(seq), kind, status, key))
    tool_keys: dict[str, tuple[str, int]] = {}
    for run_id, (_, parent, *_rest) in by_id.items():
        journal = steps[run_id]
        shape = ROOT_SHAPE if parent is None else CHILD_SHAPE
        assert [(k, s) for s, k, _st, _key in journal] == shape, (run_id, journal)
        assert all(st == "completed" for _s, _k, st, _key in journal), (run_id, journal)
        for seq, kind, _st, key in journal:
            if kind == "tool":
                assert key == f"{run_id}:{seq}", (run_id, seq, key)
                tool_keys[key] = (run_id, seq)
        tally.steps += len(journal)

    effects = rows(db_url, "SELECT key, run_id, step, label FROM chaos_effects")
    attempts = rows(db_url, "SELECT key, run_id, step, label FROM chaos_attempts")
    effect_keys = Counter(e[0] for e in effects)
    assert max(effect_keys.values(), default=1) == 1
    assert set(effect_keys) == set(tool_keys), (
        f"effects without a journaled step: {sorted(set(effect_keys) - set(tool_keys))[:5]}, "
        f"journaled steps without effect: {sorted(set(tool_keys) - set(effect_keys))[:5]}")
    for key, run_id, step, label in effects:
        assert tool_keys[key] == (run_id, step)
        assert label == LABELS[(step - 2) // 2]
    stray = {a[0] for a in attempts} - set(tool_keys)
    assert not stray, f"attempts under keys the journal does not know: {sorted(stray)[:5]}"
    tally.effects, tally.attempts = len(effects), len(attempts)
    tally.reexecuted_keys = sum(1 for n in Counter(a[0] for a in attempts).values() if n > 1)

    ledgers = rows(db_url, "SELECT id, used FROM ledgers")
    assert sorted(lid for lid, _ in ledgers) == sorted(roots)  # one per tree (no sub-budgets)
    for ledger_id, used in ledgers:
        # one reservation per journaled step of the tree, never twice after a crash
        assert used.get("steps") == len(ROOT_SHAPE) + len(CHILD_SHAPE), (ledger_id, used)
        assert used.get("tool_calls") == len(LABELS), (ledger_id, used)

    for run_id in by_id:
        records = await store.list_audit(run_id)
        result = verify_chain(records, key=AUDIT_KEY.encode(), run_id=run_id)
        assert result.ok, f"audit chain of {run_id}: seq {result.first_bad_seq}: {result.reason}"
        tally.audit_records += result.count
    return tally


def doctor_orphans(env: dict[str, str]) -> int:
    out = alpaca("doctor", "--json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(json.loads(out.stdout)["orphan_count"])


def finished_roots(db_url: str) -> int:
    return int(rows(db_url, "SELECT count(*) FROM runs WHERE parent_id IS NULL AND "
                            "state = ANY(%s)", TERMINAL)[0][0])


def leases_of(db_url: str, pid: int) -> list[str]:
    return [r[0] for r in rows(db_url, "SELECT id FROM runs WHERE state='running' AND "
                                       "lease_owner LIKE %s", f"%:{pid}:%")]


# -- the chaos test --------------------------------------------------------------------------


@dataclass
class Pause:
    """The SIGSTOP/SIGCONT episode: who was paused, what it held, what happened to it."""

    slot: int
    pid: int
    held: list[str]
    since: float
    taken_over: list[str] = field(default_factory=list)
    resumed_at: float = 0.0
    survived: bool | None = None
    lease_lost_logs: int = 0
    lock_waiters: int = 0
    """Sessions blocked on a row lock when SIGCONT came (the paused one holding it)."""


def taken_over(db_url: str, pause: Pause) -> list[str]:
    """The paused worker's runs that someone else owns now (or that went back to the queue)."""
    return [r[0] for r in rows(
        db_url, "SELECT id FROM runs WHERE id = ANY(%s) AND "
        "(lease_owner IS NULL OR lease_owner NOT LIKE %s)", pause.held, f"%:{pause.pid}:%")]


# A hang guard only: every phase below fails earlier, with its reason, once it stops progressing.
@pytest.mark.timeout(3600)
async def test_chaos_kill_pause_and_redis_restart_lose_nothing(
    database: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("ALPACA_CHAOS_SEED", str(time.time_ns() % 10**9)))
    rng = random.Random(seed)
    env = worker_env(database, redis_server.url)
    workers = Workers(env, tmp_path)
    workflow = load_workflow(WORKFLOW)
    wall0 = time.monotonic()
    kills = 0
    pause: Pause | None = None
    redis_restarted = False
    roots: list[str] = []
    try:
        for n in range(3):
            workers.spawn(n)
        async with submitter(database, redis_server.url) as (engine, store):

            async def feed() -> None:
                # Keep the workers saturated (a backlog of IN_FLIGHT trees) so every kill
                # lands on busy workers, until RUNS trees are submitted.
                while len(roots) < RUNS:
                    if len(roots) - finished_roots(database) >= IN_FLIGHT:
                        await asyncio.sleep(0.05)
                        continue
                    roots.append((await engine.submit(workflow, "coordinator",
                                                      f"job-{len(roots):04d}")).id)

            feeding = asyncio.create_task(feed())
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            next_kill, pause_at, redis_at = t0 + KILL_GAP, t0 + 3.0, t0 + 8.0
            kill_at_roots = rng.randint(*KILL_EVERY)
            redis_up_at = 0.0
            progress = Progress(lambda: terminal_runs(database))
            next_check = t0
            while True:
                now = loop.time()
                episode_done = pause is not None and pause.survived is not None
                killing = not feeding.done()
                if not killing and episode_done and redis_restarted:
                    break
                if now >= next_check:
                    next_check = now + 1.0
                    assert not progress.stalled(), (
                        f"no run finished for {STALL_SECONDS:.0f}s during the chaos; runs by "
                        f"state: {state_counts(database)}; pause: {pause}\n{workers.logs()}")
                if pause is None and now >= pause_at:
                    # Pause a worker holding leases for longer than lease + reaper interval.
                    holding = [n for n in workers.alive() if leases_of(database, workers.pid(n))]
                    if holding:
                        slot = rng.choice(holding)
                        pid = workers.pid(slot)
                        workers.signal(slot, signal.SIGSTOP)
                        pause = Pause(slot, pid, leases_of(database, pid), since=now)
                if pause is not None and not pause.resumed_at:
                    # Stay paused until another worker took over what it held (that takes
                    # longer on a loaded machine), then SIGCONT it into the fence.
                    paused_for = now - pause.since
                    pause.taken_over = taken_over(database, pause)
                    if (paused_for >= PAUSE_AT_LEAST and pause.taken_over) \
                            or paused_for >= STALL_SECONDS:
                        pause.lock_waiters = int(rows(
                            database, "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND wait_event_type = 'Lock'")[0][0])
                        workers.signal(pause.slot, signal.SIGCONT)
                        pause.resumed_at = now
                if pause is not None and pause.resumed_at and pause.survived is None:
                    # Give it time to run into the fence: until it logs the lost lease (its
                    # next heartbeat), or a generous while if its writes never needed one.
                    log_text = workers.slots[pause.slot].log.read_text(errors="replace")
                    if "lease lost" in log_text or now >= pause.resumed_at + 60.0:
                        proc = workers.slots[pause.slot].proc
                        pause.survived = proc.pid == pause.pid and proc.poll() is None
                        pause.lease_lost_logs = log_text.count("lease lost")
                if redis_at and now >= redis_at and finished_roots(database):
                    redis_server.kill()  # once workers are through a first tree
                    redis_at, redis_up_at = 0.0, now + 1.5
                if redis_up_at and now >= redis_up_at:
                    redis_server.start()
                    redis_up_at, redis_restarted = 0.0, True
                if killing and now >= next_kill and finished_roots(database) >= kill_at_roots:
                    # A worker that is up and, if possible, in the middle of runs; never the
                    # paused one, nor it in the seconds after SIGCONT.
                    spared = pause.slot if pause and pause.survived is None else None
                    victims = [n for n in workers.ready() if n != spared]
                    busy = [n for n in victims if leases_of(database, workers.pid(n))]
                    if victims:
                        victim = rng.choice(busy or victims)
                        workers.kill(victim)
                        workers.spawn(victim)
                        kills += 1
                        kill_at_roots = finished_roots(database) + rng.randint(*KILL_EVERY)
                        next_kill = now + KILL_GAP
                    else:
                        next_kill = now + 0.25  # all still starting: try again shortly
                workers.restart_refused_starts()
                await asyncio.sleep(0.05)
            chaos_wall = loop.time() - t0
            await feeding
            assert pause is not None and pause.survived, f"pause episode incomplete: {pause}"
            assert redis_restarted
            assert sorted(workers.alive()) == [0, 1, 2], workers.logs()
            settle = await wait_all_terminal(database, 2 * RUNS)
            tally = await check_everything(database, store, roots)
        assert doctor_orphans(env) == 0
        # After the restart (an empty Redis) the workers recreated the consumer group and
        # took deliveries from it again.
        group = redis_client.Redis.from_url(redis_server.url).xinfo_groups("alpaca:runs")
        assert [g["name"] for g in group] == [b"workers"] and group[0]["entries-read"], group
        assert not workers.problems(), "\n".join(workers.problems())
        for root in {roots[0], roots[-1], *(r.split(".")[0] for r in pause.held[:2])}:
            verified = alpaca("audit", "verify", root, "--tree", env=env)
            assert verified.returncode == 0, verified.stdout + verified.stderr
        # The runs the paused worker held were taken over (lease expiry) while it slept, and
        # it survived SIGCONT: its stale writes were refused by the fence, and the journal,
        # effect and audit checks above show it corrupted nothing.
        assert pause.taken_over, (
            f"no run of the paused worker was taken over in {STALL_SECONDS:.0f}s "
            f"(lease {LEASE_SECONDS:.0f}s); {pause.lock_waiters} session(s) were blocked on a "
            f"row lock, presumably held by the paused worker's open transaction: {pause}")
        for run_id in pause.taken_over:
            reasons = [str(d.get("reason", "")) for k, d in rows(
                database, "SELECT kind, data FROM audit WHERE run_id=%s ORDER BY seq", run_id)
                if k == "state.changed"]
            assert any("expired" in x for x in reasons), (run_id, reasons)
    finally:
        workers.stop_all()
    wall = time.monotonic() - wall0
    print(f"\nchaos (seed {seed}): {RUNS} root + {RUNS} child runs, {tally.steps} steps; "
          f"{kills} SIGKILL+restart; SIGSTOP {pause.resumed_at - pause.since:.0f}s of a worker "
          f"holding "
          f"{len(pause.held)} lease(s), {len(pause.taken_over)} taken over, "
          f"{pause.lease_lost_logs} stale write(s) refused ('lease lost'); 1 Redis restart; "
          f"side effects: {tally.attempts} attempts -> {tally.effects} effects "
          f"({tally.reexecuted_keys} keys executed more than once); {tally.audit_records} "
          f"audit records verified; chaos {chaos_wall:.1f}s + settle {settle:.1f}s, "
          f"wall {wall:.1f}s")


# -- graceful shutdown -----------------------------------------------------------------------

_CLAIMED = re.compile(r"claimed by (\S+)")


def claimers(history: list[tuple[str, str, float]]) -> list[str]:
    """The owners that claimed a run, in order, from its audit history."""
    return [m.group(1) for kind, reason, _ in history
            if kind == "state.changed" and (m := _CLAIMED.search(reason))]


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(1200)
async def test_sigterm_drains_finishing_or_releasing_in_flight_runs(
    database: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """SIGTERM: a run that can finish in the 10 s drain window finishes, one that cannot is
    released (queued, not left running under the lease), and another worker completes both.

    Gates, not durations, decide which is which: both children block in their first effect;
    the fast one's gate opens with the SIGTERM (its remaining work takes well under a second),
    the slow one's only after the drained worker has exited."""
    gates = tmp_path / "gates"
    gates.mkdir()
    env = worker_env(database, redis_server.url, lease=30.0)  # a kept lease would stick
    env["ALPACA_CHAOS_GATES"] = str(gates)
    workers = Workers(env, tmp_path, concurrency=2)
    workflow = load_workflow(WORKFLOW)
    try:
        async with submitter(database, redis_server.url) as (engine, store):
            slow = await engine.submit(workflow, "coordinator", "job-slow hold=slow")
            fast = await engine.submit(workflow, "coordinator", "job-fast hold=fast")
            first = workers.spawn(0)
            # Wait until both children are inside a tool step on the first worker.
            deadline = time.monotonic() + STALL_SECONDS
            while True:
                started = rows(database, "SELECT s.run_id FROM steps s JOIN runs r "
                                         "ON r.id = s.run_id WHERE s.kind='tool' AND "
                                         "s.status='started' AND r.state='running' AND "
                                         "r.lease_owner LIKE %s", f"%:{first.proc.pid}:%")
                if {f"{slow.id}.2", f"{fast.id}.2"} <= {r[0] for r in started}:
                    break
                assert time.monotonic() < deadline, workers.logs()
                await asyncio.sleep(0.05)
            owner = rows(database, "SELECT lease_owner FROM runs WHERE id=%s",
                         f"{slow.id}.2")[0][0]
            term_at = time.time()
            first.proc.send_signal(signal.SIGTERM)
            (gates / "fast").touch()
            workers.spawn(1)
            assert first.proc.wait(STALL_SECONDS) == 0, workers.logs()
            drained = time.time() - term_at
            (gates / "slow").touch()
            assert "worker stopped after" in first.log.read_text()
            # Nothing is left running under the drained worker's (30 s) lease.
            assert not rows(database, "SELECT id FROM runs WHERE state='running' AND "
                                      "lease_owner=%s", owner)
            await wait_all_terminal(database, 4)
            tally = await check_everything(database, store, [slow.id, fast.id])

            def history(run_id: str) -> list[tuple[str, str, float]]:
                return [(k, d.get("reason", ""), _iso(t)) for k, d, t in rows(
                    database, "SELECT kind, data, time FROM audit WHERE run_id=%s ORDER BY seq",
                    run_id)]

            # The fast child finished on the draining worker, after SIGTERM, never released.
            fast_child = history(f"{fast.id}.2")
            assert claimers(fast_child) == [owner], fast_child
            finished = [t for k, r, t in fast_child if k == "state.changed" and r == "finished"]
            assert finished and finished[0] > term_at, fast_child
            # The slow child was released by it (not expired, not stolen), then resumed.
            slow_child = history(f"{slow.id}.2")
            kinds = [k for k, _, _ in slow_child]
            assert "lease.released" in kinds, slow_child
            assert not any("expired" in r or "taken over" in r for _, r, _ in slow_child)
            claims = claimers(slow_child)
            assert len(claims) == 2 and claims[0] == owner and claims[1] != owner, slow_child
            # The interrupted effect ran again under the same key, and happened once.
            per_key = Counter(r[0] for r in rows(
                database, "SELECT key FROM chaos_attempts WHERE run_id=%s", f"{slow.id}.2"))
            assert max(per_key.values()) == 2 and tally.effects == 6, per_key
        assert doctor_orphans(env) == 0
        print(f"\nsigterm: drained in {drained:.1f}s; fast child finished during the drain, "
              f"slow child released and completed by another worker; "
              f"{tally.attempts} attempts -> {tally.effects} effects")
    finally:
        workers.stop_all()


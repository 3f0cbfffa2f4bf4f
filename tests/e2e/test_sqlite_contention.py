"""Three real processes on one SQLite file (issue 14 target 2): while one holds a long write
transaction, an `alpaca worker` running a tool call longer than its lease keeps its event
loop serving and its lease, and an `alpaca serve` beside it keeps answering requests.

The writer holds the lock for half the lease: no process can commit anything meanwhile
(a heartbeat is a write too), so a hold longer than the lease would leave the lease to
whichever writer gets the lock first once it is free. What the engine promises is that
waiting for the lock never stalls a process: before the change, each process's event loop
blocked inside its next write (a queue poll, a heartbeat) until the lock was released.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_crash_resume import alpaca
from tests.helpers import PATIENCE, free_port, stop, wait_ready

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).parent / "contentionwf" / "workflow.yaml"
LEASE = 9.0
"""Heartbeats every 3 s: with the 4.5 s hold, a renewal is due well inside the lease."""
HOLD = LEASE / 2

# The third process: a plain sqlite3 client holding the write lock, as any other writer can.
WRITER = """
import sqlite3, sys, time
path, held, released, seconds = sys.argv[1:]
db = sqlite3.connect(path, isolation_level=None, timeout=300)
db.execute("BEGIN IMMEDIATE")
db.execute("CREATE TABLE IF NOT EXISTS contention_probe (x)")
db.execute("INSERT INTO contention_probe VALUES (1)")
open(held, "w").write(repr(time.time()))
time.sleep(float(seconds))
db.execute("COMMIT")
open(released, "w").write(repr(time.time()))
"""


def wait_for(what: str, check: Any, *procs: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + PATIENCE
    while not (got := check()):
        for p in procs:
            assert p.poll() is None, f"a process exited while waiting for {what}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)
    return got


def run_row(db_path: Path, run_id: str) -> sqlite3.Row:
    with sqlite3.connect(db_path, timeout=PATIENCE) as db:  # a read: never waits in WAL mode
        db.row_factory = sqlite3.Row
        row: sqlite3.Row = db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return row


def test_a_long_write_elsewhere_stalls_no_loop_and_costs_no_lease(tmp_path: Path) -> None:
    db_path = tmp_path / "alpaca.db"
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{db_path}",
           "ALPACA_LEASE_SECONDS": str(LEASE), "ALPACA_TEST_DIR": str(tmp_path),
           "COLUMNS": "200"}
    submitted = alpaca("run", str(WORKFLOW), "--agent", "holder", "--input", "go",
                       "--submit-only", env=env)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    effects, ticks = tmp_path / "effects.jsonl", tmp_path / "ticks"
    held, released = tmp_path / "held", tmp_path / "released"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[str]] = []
    with open(tmp_path / "worker.log", "w") as wlog, open(tmp_path / "serve.log", "w") as slog:
        try:
            worker = subprocess.Popen([sys.executable, "-m", "alpaca_engine", "worker"],
                                      env=env, stdout=wlog, stderr=subprocess.STDOUT, text=True)
            procs.append(worker)
            wait_for("the tool call", ticks.exists, worker)
            server = subprocess.Popen(
                [sys.executable, "-m", "alpaca_engine", "serve", "--port", str(port),
                 "--workflow", str(WORKFLOW)], env=env, stdout=slog, stderr=subprocess.STDOUT,
                text=True)
            procs.append(server)
            wait_ready(server, base)
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path), str(held),
                                       str(released), str(HOLD)], text=True)
            procs.append(writer)
            wait_for("the write lock", held.exists, writer)
            held_at = float(held.read_text())
            time.sleep(max(0.0, held_at + 2 - time.time()))  # both have tried to write by now
            answer = httpx.get(f"{base}/v1/runs/{run_id}", timeout=PATIENCE)
            answered_at = time.time()
            assert answer.status_code == 200 and answer.json()["state"] == "running"
            assert writer.wait(PATIENCE) == 0
            released_at = float(released.read_text())
            # the server answered while the lock was still held ...
            assert answered_at < released_at, "alpaca serve stalled until the lock was free"
            # ... and the worker's loop went on running the tool call meanwhile
            during = [t for t in map(float, ticks.read_text().split())
                      if held_at + 1.5 < t < released_at - 0.5]
            assert during, "the worker's event loop stalled while the lock was held"
            # its heartbeat renews the lease once the lock is free, and the lease holds
            wait_for("a lease renewal after the lock",
                     lambda: (run_row(db_path, run_id)["lease_expires_at"] or 0) > released_at,
                     worker, server)
            first_tick = float(ticks.read_text().split()[0])
            time.sleep(max(0.0, first_tick + LEASE + 1 - time.time()))  # longer than a lease
            (tmp_path / "stop").touch()
            wait_for("the run to finish",
                     lambda: run_row(db_path, run_id)["state"] == "succeeded", worker, server)
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    stop(p, 15)
    row = run_row(db_path, run_id)
    assert (row["state"], row["output"], row["epoch"], row["crash_count"]) == (
        "succeeded", "done", 1, 0)  # claimed once, never taken over
    calls = [json.loads(x) for x in effects.read_text().splitlines()]
    assert [c["pid"] for c in calls] == [worker.pid]  # the tool ran once, in the worker
    with sqlite3.connect(db_path) as db:
        audit = [(k, json.loads(d)) for k, d in db.execute(
            "SELECT kind, data FROM audit WHERE run_id=? ORDER BY seq", (run_id,))]
        steps = db.execute("SELECT seq, kind, status FROM steps WHERE run_id=? ORDER BY seq",
                           (run_id,)).fetchall()
    assert [d["to"] for k, d in audit if k == "state.changed"] == ["running", "succeeded"]
    assert steps == [(1, "model", "completed"), (2, "tool", "completed"),
                     (3, "model", "completed")]
    logs = (tmp_path / "worker.log").read_text() + (tmp_path / "serve.log").read_text()
    assert "lease lost" not in logs and "Traceback" not in logs, logs
    verify = alpaca("audit", "verify", run_id, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr

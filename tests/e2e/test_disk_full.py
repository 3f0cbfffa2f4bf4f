"""A full disk in the middle of a run loses nothing (DESIGN §4, issue 10 §5).

The database lives on a small tmpfs mounted by the test; a tool fills it while the run is
in flight, so the journal write after that tool fails with SQLITE_FULL. The command says so
in one line and exits 1, the journal keeps every completed step and the one in flight, and
once space returns the run resumes and finishes without executing a completed step again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faultkit import tmpfs

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).parent / "faultwf" / "workflow.yaml"


def alpaca(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=90)


def effects(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def env_for(tmp_path: Path, disk: Path) -> dict[str, str]:
    return {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{disk}/alpaca.db",
            "ALPACA_TEST_EFFECTS": str(tmp_path / "effects.jsonl"),
            "ALPACA_TEST_MARKER": str(tmp_path / "marker"),
            "ALPACA_TEST_FILL_DIR": str(disk), "COLUMNS": "80"}


def assert_one_line(done: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def check_journal_then_resume(run_id: str, env: dict[str, str], tmp_path: Path) -> None:
    shown = alpaca("runs", "show", run_id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    # Nothing was marked: the run is not terminal, the step in flight is journaled `started`.
    assert data["run"]["state"] in ("running", "queued")
    assert [(s["seq"], s["kind"], s["status"]) for s in data["steps"]] == [
        (1, "model", "completed"), (2, "tool", "completed"), (3, "model", "completed"),
        (4, "tool", "started")]
    resumed = alpaca("runs", "resume", run_id, "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads(resumed.stdout)
    assert final["state"] == "succeeded"
    assert final["output"] == "recorded first, fill, last"
    steps = json.loads(alpaca("runs", "show", run_id, "--json", env=env).stdout)["steps"]
    assert [s["status"] for s in steps] == ["completed"] * 7
    done = effects(tmp_path / "effects.jsonl")
    # "first" completed before the disk filled: never again. "fill" was in flight: executed
    # again after the resume, with the same idempotency key (at-least-once, DESIGN §4).
    assert [e["label"] for e in done] == ["first", "fill", "fill", "last"]
    assert done[1]["key"] == done[2]["key"] == f"{run_id}:4"
    verified = alpaca("audit", "verify", run_id, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_disk_full_mid_run_says_one_line_then_the_run_resumes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        env = env_for(tmp_path, disk)
        done = alpaca("run", str(WORKFLOW), "--agent", "writer", "--input", "go", env=env)
        line = assert_one_line(done, "disk", "full", "alpaca runs resume")
        assert line.startswith("error: database sqlite:///")
        assert (tmp_path / "marker").exists()  # the run really got to the filling tool
        (disk / "filler").unlink()  # space returns
        listed = json.loads(alpaca("runs", "list", "--json", env=env).stdout)
        [run] = listed
        check_journal_then_resume(run["id"], env, tmp_path)


def test_a_worker_on_a_full_disk_logs_one_line_and_a_later_worker_finishes(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        env = {**env_for(tmp_path, disk), "ALPACA_LEASE_SECONDS": "1",
               "ALPACA_POLL_INTERVAL": "0.1", "ALPACA_LOG_FORMAT": "json"}
        submitted = alpaca("run", str(WORKFLOW), "--agent", "writer", "--input", "go",
                           "--submit-only", env=env)
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip()
        worker = alpaca("worker", "--until-idle", env=env)
        assert worker.returncode == 0, worker.stderr
        assert "Traceback" not in worker.stderr
        logs = [json.loads(x) for x in worker.stderr.splitlines() if x.startswith("{")]
        faults = [x for x in logs if "full" in x["msg"]]
        assert len(faults) == 1, logs
        assert run_id in faults[0]["msg"] and "later resume" in faults[0]["msg"]
        assert faults[0]["level"] == "WARNING"
        (disk / "filler").unlink()
        time.sleep(1.5)  # the dead run's lease (1 s) expires; the next worker's reaper requeues it
        again = alpaca("worker", "--until-idle", env=env)
        assert again.returncode == 0, again.stderr
        shown = json.loads(alpaca("runs", "show", run_id, "--json", env=env).stdout)
        assert shown["run"]["state"] == "succeeded"
        assert [e["label"] for e in effects(tmp_path / "effects.jsonl")] == [
            "first", "fill", "fill", "last"]

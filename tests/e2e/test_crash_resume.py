"""SIGKILL a real `alpaca run` in the middle of a tool call; resume it from a new process.

Checks DESIGN §4: completed steps are not executed again, the interrupted call runs again
with the same idempotency key, and the model is sent the same conversation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PATIENCE

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
WORKFLOW = HERE / "crashwf" / "workflow.yaml"


def alpaca(*args: str, env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=PATIENCE, **kw)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/alpaca.db",
            "ALPACA_TEST_EFFECTS": str(tmp_path / "effects.jsonl"),
            "ALPACA_TEST_MARKER": str(tmp_path / "marker"),
            "ALPACA_TEST_MODEL_LOG": str(tmp_path / "model.jsonl"),
            "ALPACA_LEASE_SECONDS": "30", "COLUMNS": "200"}


def start_and_kill(env: dict[str, str], tmp_path: Path) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpaca_engine", "run", str(WORKFLOW), "--agent", "writer",
         "--input", "go"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + PATIENCE
    while not (tmp_path / "marker").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the blocking tool call never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    listed = alpaca("runs", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    [run] = json.loads(listed.stdout)
    assert run["state"] == "running"  # the killed process could not record anything
    return str(run["id"])


def check_resumed(run_id: str, env: dict[str, str], tmp_path: Path) -> None:
    shown = alpaca("runs", "show", run_id, "--json", env=env)
    data = json.loads(shown.stdout)
    assert data["run"]["state"] == "succeeded"
    assert data["run"]["output"] == "wrote first, block, last"
    steps = data["steps"]
    assert [(s["seq"], s["kind"], s["status"]) for s in steps] == [
        (1, "model", "completed"), (2, "tool", "completed"), (3, "model", "completed"),
        (4, "tool", "completed"), (5, "model", "completed"), (6, "tool", "completed"),
        (7, "model", "completed")]
    effects = lines(tmp_path / "effects.jsonl")
    # "first" ran once (completed before the crash); "block" twice, with the same key
    assert [e["label"] for e in effects] == ["first", "block", "block", "last"]
    assert effects[1]["key"] == effects[2]["key"] == f"{run_id}:4"
    assert effects[1]["pid"] != effects[2]["pid"]
    calls = lines(tmp_path / "model.jsonl")
    killed_pid = effects[1]["pid"]
    before = [c for c in calls if c["pid"] == killed_pid]
    after = [c for c in calls if c["pid"] != killed_pid]
    assert len(before) == 2 and len(after) == 2  # no model turn was asked twice
    # the first model call after the resume saw the pre-crash conversation, unchanged
    resumed = after[0]["messages"]
    assert resumed[: len(before[-1]["messages"])] == before[-1]["messages"]
    assert resumed[-1]["content"] == '"done block"'


def test_sigkill_mid_tool_then_runs_resume(env: dict[str, str], tmp_path: Path) -> None:
    run_id = start_and_kill(env, tmp_path)
    resumed = alpaca("runs", "resume", run_id, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "succeeded" in resumed.stdout
    check_resumed(run_id, env, tmp_path)
    doctor = alpaca("doctor", "--json", env=env)
    assert doctor.returncode == 0 and json.loads(doctor.stdout)["orphan_count"] == 0


def test_sigkill_mid_tool_then_worker_resumes_automatically(
    env: dict[str, str], tmp_path: Path
) -> None:
    run_id = start_and_kill(env, tmp_path)
    doctor = alpaca("doctor", "--json", env=env)
    assert doctor.returncode == 1
    assert json.loads(doctor.stdout)["orphans"][0]["run_id"] == run_id
    worker = alpaca("worker", "--until-idle", env=env)
    assert worker.returncode == 0, worker.stderr
    check_resumed(run_id, env, tmp_path)

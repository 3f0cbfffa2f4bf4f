"""An approval pause survives SIGKILL: pause in a worker, kill it, approve from a new process,
a new worker completes the run with exactly the approved arguments."""

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

WORKFLOW = Path(__file__).parent / "approvalwf" / "workflow.yaml"


def alpaca(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=PATIENCE)


def poll(fn: Any, what: str, seconds: float = PATIENCE) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_pause_sigkill_approve_from_new_process_completes(tmp_path: Path) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/a.db",
           "ALPACA_TEST_EFFECTS": str(tmp_path / "effects.jsonl"), "COLUMNS": "200",
           "ALPACA_POLL_INTERVAL": "0.1"}
    worker = subprocess.Popen([sys.executable, "-m", "alpaca_engine", "worker"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        submitted = alpaca("run", str(WORKFLOW), "--agent", "announcer", "--input", "go",
                           "--submit-only", "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        run_id = json.loads(submitted.stdout)["id"]

        def pending() -> list[dict[str, Any]]:
            out = alpaca("approvals", "list", "--json", env=env)
            return [a for a in json.loads(out.stdout) if a["run_id"] == run_id]

        [approval] = poll(pending, "the approval request")
        assert approval["arguments"] == {"message": "launch at noon"}
        assert worker.poll() is None
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    shown = json.loads(alpaca("runs", "show", run_id, "--json", env=env).stdout)
    assert shown["run"]["state"] == "waiting"
    assert not (tmp_path / "effects.jsonl").exists()  # nothing happened without approval

    decided = alpaca("approvals", "approve", approval["id"], "--by", "sue", "-m", "go ahead",
                     env=env)
    assert decided.returncode == 0, decided.stderr
    again = alpaca("approvals", "approve", approval["id"], env=env)
    assert again.returncode == 1 and "already approved" in again.stderr

    finished = alpaca("worker", "--until-idle", env=env)
    assert finished.returncode == 0, finished.stderr
    shown = json.loads(alpaca("runs", "show", run_id, "--json", env=env).stdout)
    assert shown["run"]["state"] == "succeeded" and shown["run"]["output"] == "announced"
    effects = [json.loads(x) for x in (tmp_path / "effects.jsonl").read_text().splitlines()]
    assert effects == [{"message": "launch at noon", "key": f"{run_id}:2"}]
    listed = json.loads(alpaca("approvals", "list", "--all", "--json", env=env).stdout)
    assert listed[0]["decided_by"] == "sue" and listed[0]["comment"] == "go ahead"
    verify = alpaca("audit", "verify", run_id, env=env)
    assert verify.returncode == 0, verify.stdout

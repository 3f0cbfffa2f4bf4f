"""A poison tool cannot take a real `alpaca` process down.

`alpaca run` of a tool calling ``sys.exit(3)`` records a ``tool_error`` step and exits 1
(never 3, the "waiting" code, never with the run left ``running``); a sync tool blocking for
five minutes past its 0.5 s timeout does not hold `alpaca run` open; a worker that runs a
poison tool keeps serving the other runs.
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

from tests.helpers import stop

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).parent / "poisonwf" / "workflow.yaml"


def alpaca(*args: str, env: dict[str, str],
           timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/poison.db",
            "ALPACA_POLL_INTERVAL": "0.1", "COLUMNS": "200"}


def shown(run_id: str, env: dict[str, str]) -> dict[str, Any]:
    out = alpaca("runs", "show", run_id, "--json", env=env)
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_alpaca_run_records_a_sys_exit_tool_as_tool_error_and_exits_1(
        env: dict[str, str]) -> None:
    done = alpaca("run", str(WORKFLOW), "--agent", "exiter", "--input", "go", "--json", env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    run = json.loads(done.stdout)
    assert run["state"] == "failed" and run["error_code"] == "max_steps_exceeded"
    steps = shown(run["id"], env)["steps"]
    assert [(s["kind"], s["status"]) for s in steps] == [("model", "completed"),
                                                         ("tool", "failed")]
    assert steps[1]["error"] == {"code": "tool_error", "message": "SystemExit: 3"}


def test_alpaca_run_does_not_wait_for_a_sync_tool_that_ignores_its_timeout(
        env: dict[str, str]) -> None:
    started = time.monotonic()
    done = alpaca("run", str(WORKFLOW), "--agent", "sleeper", "--input", "go", "--json",
                  env=env, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    # The tool sleeps 300 s; the process must end long before (generous for a loaded box).
    assert elapsed < 100, f"alpaca run stayed {elapsed:.0f}s for the abandoned tool"
    run = json.loads(done.stdout)
    steps = shown(run["id"], env)["steps"]
    assert steps[1]["error"]["code"] == "tool_timeout"


def test_a_worker_survives_a_poison_tool_and_serves_the_next_run(
        env: dict[str, str]) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-m", "alpaca_engine", "worker", "--concurrency", "1"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ids = []
        for agent in ("survivor", "greeter"):
            sub = alpaca("run", str(WORKFLOW), "--agent", agent, "--input", "go",
                         "--submit-only", env=env)
            assert sub.returncode == 0, sub.stderr
            ids.append(sub.stdout.strip())
        deadline = time.monotonic() + 90
        runs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert worker.poll() is None, f"the worker exited: {worker.communicate()}"
            runs = {rid: shown(rid, env)["run"] for rid in ids}
            if all(r["state"] in ("succeeded", "failed") for r in runs.values()):
                break
            time.sleep(0.2)
        survivor, greeter = (runs[rid] for rid in ids)
        assert survivor["state"] == "succeeded" and survivor["output"] == "survived"
        assert greeter["state"] == "succeeded" and greeter["output"] == "greeted"
        poison_step = shown(ids[0], env)["steps"][1]
        assert poison_step["error"] == {"code": "tool_error", "message": "SystemExit: 3"}
        assert worker.poll() is None  # still serving
    finally:
        stop(worker, 30)
    assert worker.returncode == 0, worker.stderr.read() if worker.stderr else ""

"""A run that keeps crashing its workers is quarantined, not requeued for ever (DESIGN §3).

Its tool SIGKILLs the `alpaca worker` process running it. The test restarts a worker each time
one dies, as a supervisor would, with 1 s leases and ALPACA_MAX_RUN_ATTEMPTS=3: after the third
crashed attempt the run is `failed` with `crash_loop` and an audited quarantine record, the
healthy run submitted beside it succeeds, and the last worker exits normally.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.test_crash_resume import alpaca

pytestmark = pytest.mark.e2e

WORKFLOW = Path(__file__).parent / "crashloopwf" / "workflow.yaml"


def submit(agent: str, env: dict[str, str]) -> str:
    queued = alpaca("run", str(WORKFLOW), "--agent", agent, "--input", "go", "--submit-only",
                    env=env)
    assert queued.returncode == 0, queued.stderr
    return queued.stdout.strip()


def test_a_run_crashing_its_workers_is_quarantined(tmp_path: Path) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/alpaca.db",
           "ALPACA_TEST_EFFECTS": str(tmp_path / "attempts.txt"),
           "ALPACA_LEASE_SECONDS": "1", "ALPACA_MAX_RUN_ATTEMPTS": "3", "COLUMNS": "200"}
    poison = submit("poison", env)
    healthy = submit("healthy", env)
    exits = []
    deadline = time.monotonic() + 240
    while True:  # a supervisor: restart the worker whenever it dies
        assert time.monotonic() < deadline, f"still crash-looping after {exits}"
        worker = alpaca("worker", "--until-idle", "--concurrency", "1", env=env)
        exits.append(worker.returncode)
        if worker.returncode == 0:
            break
        assert worker.returncode == -signal.SIGKILL, worker.stderr
        assert len(exits) <= 6, f"the run was requeued for ever: {exits}"
    attempts = (tmp_path / "attempts.txt").read_text().split()
    assert len(attempts) == 3 == exits.count(-signal.SIGKILL)  # three crashed attempts, no more

    shown = json.loads(alpaca("runs", "show", poison, "--json", env=env).stdout)["run"]
    assert (shown["state"], shown["error_code"]) == ("failed", "crash_loop")
    assert "3 times" in shown["error_message"]
    assert json.loads(alpaca("runs", "show", healthy, "--json", env=env).stdout)["run"][
        "state"] == "succeeded"

    exported = alpaca("audit", "export", poison, env=env)
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    [quarantine] = [r for r in records if r["kind"] == "run.quarantined"]
    assert quarantine["data"]["crash_count"] == 3 and quarantine["data"]["max_attempts"] == 3
    assert records[-1]["kind"] == "state.changed"
    assert records[-1]["data"]["to"] == "failed"
    assert records[-1]["data"]["error_code"] == "crash_loop"
    verified = alpaca("audit", "verify", poison, env=env)
    assert verified.returncode == 0, verified.stdout
    doctor = alpaca("doctor", "--json", env=env)
    assert doctor.returncode == 0 and json.loads(doctor.stdout)["orphan_count"] == 0


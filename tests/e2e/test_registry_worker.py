"""A workflow pushed with `alpaca workflows push --url` runs on a separate `alpaca worker`.

Real processes on one SQLite file: `alpaca serve --no-worker` (it executes nothing) and an
`alpaca worker`, which has no workflow file at all: it loads the registered version the run
pinned from the store. The CLI talks to the server over HTTP with a builder key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_workflows_ui import make_key
from tests.helpers import alpaca_serve, gated_workflow


def alpaca(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alpaca_engine", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_cli_push_then_a_separate_worker_runs_the_pinned_version(tmp_path: Path) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/reg.db",
           "ALPACA_POLL_INTERVAL": "0.05"}
    env.pop("ALPACA_URL", None)
    builder = make_key(env, "builder", "ann")
    supervisor = make_key(env, "supervisor", "sue")
    (tmp_path / "pinned.yaml").write_text(gated_workflow("answered by v1", "6 * 7"))
    (tmp_path / "pinned2.yaml").write_text(gated_workflow("answered by v2", "1 + 1"))
    worker = None
    with alpaca_serve(env, "--no-worker", "--workflow", "builtin:quickstart") as base:
        try:
            remote = {**env, "ALPACA_URL": base, "ALPACA_API_KEY": builder}
            pushed = alpaca(remote, "workflows", "push", str(tmp_path / "pinned.yaml"), "--json")
            assert pushed.returncode == 0, pushed.stderr
            assert json.loads(pushed.stdout)["ref"] == "registry:pinned@1"
            refused = alpaca({**remote, "ALPACA_API_KEY": supervisor}, "workflows", "push",
                             str(tmp_path / "pinned2.yaml"))
            assert refused.returncode == 1 and "needs the builder role" in refused.stderr
            checked = alpaca(remote, "workflows", "validate", str(tmp_path / "pinned2.yaml"))
            assert checked.returncode == 0 and "valid: pinned (agents: agent)" in checked.stdout

            sue = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {supervisor}"},
                               timeout=60)
            run = sue.post("/v1/runs", json={"workflow": "pinned", "agent": "agent",
                                             "input": "what is 6 * 7?"}).json()
            assert (run["state"], run["workflow"]) == ("queued", "registry:pinned@1")
            worker = subprocess.Popen([sys.executable, "-m", "alpaca_engine", "worker"],
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)

            def state() -> dict[str, object]:
                found: dict[str, object] = sue.get(f"/v1/runs/{run['id']}").json()
                return found

            deadline = time.monotonic() + 90
            while state()["state"] != "waiting":
                assert worker.poll() is None, worker.communicate()[1]
                assert time.monotonic() < deadline, state()
                time.sleep(0.2)
            again = alpaca(remote, "workflows", "push", str(tmp_path / "pinned2.yaml"))
            assert again.returncode == 0 and "pushed pinned version 2" in again.stdout
            [approval] = sue.get("/v1/approvals").json()["items"]
            assert sue.post(f"/v1/approvals/{approval['id']}/decision",
                            json={"decision": "approve"}).status_code == 200
            while state()["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, state()
                time.sleep(0.2)
            done = state()
            assert (done["state"], done["output"]) == ("succeeded", "answered by v1"), done

            listed = alpaca(remote, "workflows", "list", "--json")
            first = json.loads(listed.stdout)[0]
            assert (first["name"], first["version"]) == ("pinned", 2)
            graph = alpaca(remote, "workflows", "graph", "pinned@1", "--json")
            edges = [(e["kind"], e["target"]) for e in json.loads(graph.stdout)["edges"]]
            assert edges == [("uses", "tool:calculate"), ("gated", "tool:calculate")]
            shown = alpaca(remote, "workflows", "show", "pinned@1")
            assert shown.stdout == gated_workflow("answered by v1", "6 * 7")
            missing = alpaca(remote, "workflows", "show", "nope")
            assert missing.returncode == 1 and "workflow 'nope' not found" in missing.stderr
        finally:
            if worker is not None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait(5)

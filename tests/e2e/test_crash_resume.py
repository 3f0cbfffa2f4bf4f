"""SIGKILL a real `alpaca run` in the middle of a tool call; resume it from a new process.

Checks DESIGN §4: completed steps are not executed again, the interrupted call runs again
with the same idempotency key, and the model is sent the same conversation; for the second
turn of a thread (DESIGN §10) that conversation includes the first turn, rebuilt from its
journal.
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

import httpx
import pytest

from alpaca_engine.journal import conversation_digest
from alpaca_engine.models.base import Message
from tests.helpers import PATIENCE, free_port, wait_ready

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


def test_sigkill_mid_turn_two_of_a_thread_then_resume_sends_the_same_conversation(
        env: dict[str, str], tmp_path: Path) -> None:
    """A thread's second turn is killed with its server in the middle of a tool call; a new
    process resumes it: the model is sent exactly the conversation it was sent before (turn
    1 rebuilt from its journal, then the new message), and the journal's digest says so."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "alpaca_engine", "serve", "--port", str(port), "--workflow",
         str(WORKFLOW)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base)
        deadline = time.monotonic() + PATIENCE
        with httpx.Client(base_url=base, timeout=PATIENCE) as c:
            thread = c.post("/v1/threads", json={"agent": "chatter"}).json()
            first = c.post(f"/v1/threads/{thread['id']}/messages?wait=true",
                           json={"content": "first"}).json()
            assert first["state"] == "succeeded", first
            second = c.post(f"/v1/threads/{thread['id']}/messages",
                            json={"content": "block"}).json()
            assert second["turn"] == 2
        while not (tmp_path / "marker").exists():
            assert server.poll() is None, server.communicate()[0]
            assert time.monotonic() < deadline, "turn 2's blocking tool call never started"
            time.sleep(0.05)
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
    shown = json.loads(alpaca("runs", "show", second["id"], "--json", env=env).stdout)
    assert shown["run"]["state"] == "running"  # the killed server could not record anything

    resumed = alpaca("runs", "resume", second["id"], env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    shown = json.loads(alpaca("runs", "show", second["id"], "--json", env=env).stdout)
    assert shown["run"]["state"] == "succeeded"
    assert shown["run"]["output"] == "turn 2: \"done block\""
    calls = lines(tmp_path / "model.jsonl")
    killed = [c for c in calls if c["pid"] == server.pid]
    after = [c for c in calls if c["pid"] != server.pid]
    assert len(killed) == 3 and len(after) == 1  # turn 1: 2 calls, turn 2: 1 before the kill
    sent = killed[-1]["messages"]  # turn 2's first model call, before the kill
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "Perform one side effect per message."), ("user", "first"),
        ("assistant", None), ("tool", '"done first"'),
        ("assistant", 'turn 1: "done first"'), ("user", "block")]
    # after the resume: the same conversation (turn 1 from its journal), then the result
    assert after[0]["messages"][:len(sent)] == sent
    assert [m["role"] for m in after[0]["messages"][len(sent):]] == ["assistant", "tool"]
    steps = shown["steps"]
    assert [(s["seq"], s["kind"], s["status"]) for s in steps] == [
        (1, "model", "completed"), (2, "tool", "completed"), (3, "model", "completed")]
    assert steps[0]["input"]["digest"] == conversation_digest(
        [Message.model_validate(m) for m in sent])
    assert steps[2]["input"]["digest"] == conversation_digest(
        [Message.model_validate(m) for m in after[0]["messages"]])
    effects = lines(tmp_path / "effects.jsonl")
    assert [e["label"] for e in effects] == ["first", "block", "block"]
    assert effects[1]["key"] == effects[2]["key"] == f"{second['id']}:2"

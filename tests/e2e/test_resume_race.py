"""Two real `alpaca runs resume` processes of one SIGKILLed run, released at the same instant
(DESIGN §3, "one owner, always"): exactly one takes the dead owner's lease and executes the
interrupted tool call; the other prints one line saying who owns the run and exits 1.

Both read the run before either claims it (a FIFO gate in front of the claim), so each judges
the killed owner dead: before the fix the second took the lease over from the first, and the
interrupted call ran twice more."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_crash_resume import alpaca, check_resumed, env, lines, start_and_kill

pytestmark = pytest.mark.e2e
__all__ = ["env"]  # the fixture, imported for the test below

# `alpaca` itself (its real entry point), with one test gate: the first claim waits on a FIFO,
# so both processes have read the run (and judged its owner dead) and wait at the same point;
# one writer's close releases them at once, the race the lease take-over must survive.
GATED_ALPACA = """
import pathlib, sys
import alpaca_engine.cli as cli
from alpaca_engine.store.sqlite import SQLiteStore

fifo, ready, *args = sys.argv[1:]
claim = SQLiteStore.claim_run
passed = []

async def gated_claim(self, *a, **kw):
    if not passed:  # only the resume's own claim waits
        passed.append(True)
        pathlib.Path(ready).touch()
        open(fifo).read()
    return await claim(self, *a, **kw)

SQLiteStore.claim_run = gated_claim
sys.argv = ["alpaca", *args]
cli.main()
"""


def release(fifo: Path, procs: list[subprocess.Popen[str]], ready: list[Path]) -> None:
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "the resumes never got ready"
        time.sleep(0.05)
    time.sleep(0.5)  # from "ready" to blocked in open(): a few instructions
    fd = os.open(fifo, os.O_WRONLY)  # does not block: both readers wait
    os.close(fd)  # both see end of file at once


def test_two_resumes_released_together_one_executes(env: dict[str, str], tmp_path: Path):
    run_id = start_and_kill(env, tmp_path)
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    held = {**env, "ALPACA_TEST_HOLD": "1.5"}
    procs = [subprocess.Popen([sys.executable, "-c", GATED_ALPACA, str(fifo), str(r),
                               "runs", "resume", run_id], env=held, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ready]
    try:
        release(fifo, procs, ready)
        results = [(p.wait(60), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = sorted(code for code, _out, _err in results)
    assert codes == [0, 1], results
    [(_, won_out, _)] = [r for r in results if r[0] == 0]
    [(_, _, lost_err)] = [r for r in results if r[0] == 1]
    assert "succeeded" in won_out
    assert len(lost_err.strip().splitlines()) == 1, lost_err
    assert f"run {run_id} is owned by" in lost_err and "Traceback" not in lost_err
    check_resumed(run_id, env, tmp_path)  # "block" ran twice in all: killed, then once more
    effects = lines(tmp_path / "effects.jsonl")
    assert [e["label"] for e in effects].count("block") == 2
    verify = alpaca("audit", "verify", run_id, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr

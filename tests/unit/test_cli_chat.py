"""`alpaca chat`: piped (one message per line, answers on stdout, exit code of the last turn)
and interactive in a real pseudo-terminal (streamed answer, approval asked inline, Ctrl-C
leaves the thread resumable with --thread)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from alpaca_engine.cli import app
from alpaca_engine.store.records import ApprovalStatus
from alpaca_engine.store.sqlite import SQLiteStore
from tests.helpers import PATIENCE

WORKFLOW = str(Path(__file__).parent / "chat_fixtures" / "workflow.yaml")
THREAD = re.compile(r"thr_[0-9a-f]{16}")


def chat(stdin: str, *args: str) -> Result:
    return CliRunner().invoke(app, ["chat", *args], input=stdin)


def thread_of(result: Result) -> str:
    match = THREAD.search(result.stderr)
    assert match, result.stderr
    return match.group(0)


def turns(url: str, thread_id: str) -> list[tuple[int, str]]:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        return conn.execute("SELECT turn, state FROM runs WHERE thread_id = ? ORDER BY turn",
                            (thread_id,)).fetchall()


def test_piped_remembers_and_searches_with_the_bundled_demo(db: str) -> None:
    result = chat("My name is Ada.\n\n  \nWhat is my name?\nsearch launch\n",
                  "--agent", "assistant")
    assert result.exit_code == 0, result.output
    first, second, *found = result.stdout.splitlines()
    assert "Ada" in first and "Ada" in second and second.startswith("Your name is")
    assert found[0] == "Here is what I found:" and "support.html" in result.stdout
    thread_id = thread_of(result)
    assert f"--thread {thread_id}" in result.stderr and thread_id not in result.stdout
    assert turns(db, thread_id) == [(1, "succeeded"), (2, "succeeded"), (3, "succeeded")]

    again = chat("What is my name?\n", "--thread", thread_id)
    assert (again.exit_code, again.stdout) == (0, "Your name is Ada.\n")


def test_exit_code_is_the_last_turns(db: str) -> None:
    failed = chat("hello\nboom\n", "-w", WORKFLOW, "--agent", "pal")
    assert failed.exit_code == 1
    assert failed.stdout == "you said: hello\n"
    assert "turn 2 failed: internal_error" in failed.stderr

    recovered = chat("boom\nagain\n", "-w", WORKFLOW, "--agent", "pal")
    assert recovered.exit_code == 0 and recovered.stdout == "you said: again\n"

    typed = chat("one two three\n", "-w", WORKFLOW, "--agent", "typed")
    assert (typed.exit_code, typed.stdout) == (0, '{"words": 3}\n')
    as_json = chat("four words right here\n", "-w", WORKFLOW, "--agent", "typed", "--json")
    [line] = as_json.stdout.splitlines()
    message = json.loads(line)
    assert (message["turn"], message["state"], message["answer"]) == (1, "succeeded",
                                                                      {"words": 4})


def test_a_turn_waiting_for_approval_exits_3_and_continues_with_thread(db: str) -> None:
    waiting = chat("hi\ncalc 6*7\nnot sent\n", "-w", WORKFLOW, "--agent", "pal")
    assert waiting.exit_code == 3
    assert waiting.stdout == "you said: hi\n"
    thread_id = thread_of(waiting)
    assert "waits for approval apr_" in waiting.stderr and "alpaca approvals approve" in (
        waiting.stderr)
    assert turns(db, thread_id) == [(1, "succeeded"), (2, "waiting")]  # stopped reading

    still = chat("too early\n", "--thread", thread_id)
    assert still.exit_code == 3 and still.stdout == ""

    async def approve() -> None:
        store = SQLiteStore(db)
        await store.open()
        try:
            [pending] = await store.list_approvals(status=ApprovalStatus.PENDING)
            await store.decide_approval(pending.id, approve=True, by="sue", comment=None,
                                        now=time.time())
        finally:
            await store.close()

    asyncio.run(approve())
    done = chat("after\n", "--thread", thread_id)
    assert done.exit_code == 0, done.output
    assert done.stdout == "The result is 42.0.\nyou said: hi / calc 6*7 / after\n"


def test_errors_are_one_line(db: str) -> None:
    made = chat("hi\n", "-w", WORKFLOW, "--agent", "pal")
    thread_id = thread_of(made)
    cases = [
        (("--agent", "nobody"), 2, "has no agent 'nobody'"),
        ((), 2, "give --agent NAME"),
        (("--thread", "thr_0000000000000000"), 1, "thread thr_0000000000000000 not found"),
        (("--thread", thread_id, "--agent", "typed"), 2, "talks to agent 'pal', not 'typed'"),
        (("--thread", thread_id, "--tenant", "acme"), 2, "belongs to tenant 'local'"),
        (("--thread", thread_id, "-w", "builtin:demo"), 2, "not builtin:demo"),
        (("--agent", "x", "-w", "/no/such.yaml"), 1, "cannot read the file"),
    ]
    for args, code, message in cases:
        result = chat("hi\n", *args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, (args,
                                                                            result.stderr)
        assert "Traceback" not in result.output
    assert turns(db, thread_id) == [(1, "succeeded")]


def test_undecodable_bytes_on_stdin_are_one_line_and_the_thread_survives(db: str) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": db, "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([sys.executable, "-m", "alpaca_engine", "chat", "-w", WORKFLOW,
                           "--agent", "pal"], input=b"hi\n\xff\xfe bad\n",
                          capture_output=True, env=env, timeout=PATIENCE)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert "lone UTF-16 surrogate at index 0" in line and "well-formed" in line
    assert turns(db, THREAD.search(err).group(0)) == [(1, "succeeded")]  # type: ignore[union-attr]


def test_piped_ctrl_c_hands_the_turn_back(db: str) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": db}
    proc = subprocess.Popen([sys.executable, "-m", "alpaca_engine", "chat", "-w", WORKFLOW,
                             "--agent", "pal"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write("x" * 800 + "\n")  # a long answer, streamed slowly
    proc.stdin.flush()
    match = THREAD.search(proc.stderr.readline())
    assert match
    thread_id = match.group(0)
    deadline = time.monotonic() + PATIENCE
    while turns(db, thread_id) != [(1, "running")]:
        assert time.monotonic() < deadline and proc.poll() is None, turns(db, thread_id)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130 and out == ""
    assert f"alpaca chat --thread {thread_id}" in err and "Traceback" not in err
    assert turns(db, thread_id) == [(1, "queued")]
    done = chat("", "--thread", thread_id)
    assert done.exit_code == 0 and done.stdout == "you said: " + "x" * 800 + "\n"


class Terminal:
    """`alpaca chat` on a real pseudo-terminal: what it writes, and keys typed into it."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal (Ctrl-C is SIGINT)
            os.execve(sys.executable, [sys.executable, "-m", "alpaca_engine", "chat", *args],
                      env)
        self.pid, self.fd, self.out, self.pos = pid, fd, "", 0

    def _read(self, wait: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if ready:
            try:
                self.out += os.read(self.fd, 65536).decode(errors="replace")
            except OSError:  # the child closed the terminal
                time.sleep(wait)

    def expect(self, pattern: str) -> None:
        """Until ``pattern`` appears after what was expected before."""
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            found = re.compile(pattern).search(_plain(self.out), self.pos)
            if found:
                self.pos = found.end()
                return
            self._read(0.2)
        raise AssertionError(f"{pattern!r} not shown; the terminal shows:\n{_plain(self.out)}")

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self) -> int:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise AssertionError(f"alpaca chat did not exit:\n{_plain(self.out)}")


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_interactive_streams_asks_approval_and_survives_ctrl_c(db: str) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": db, "COLUMNS": "200", "TERM": "xterm"}
    term = Terminal(["-w", WORKFLOW, "--agent", "pal"], env)
    term.expect(r"you >")
    term.type("hello there\r")
    term.expect(r"pal > you said: hello there")
    term.expect(r"you >")
    term.type("calc 6*7\r")
    term.expect(r"calculate\(\{\"expression\": \"6\*7\"\}\) needs approval")
    term.expect(r"Approve calculate.*\?")
    term.type("y\r")
    term.expect(r"calculate\(.*\) → 42\.0")  # the tool step, inline
    term.expect(r"The result is 42\.0\.")
    term.expect(r"you >")
    term.type("a long message to interrupt\r")
    term.expect(r"pal > you sa")  # streamed: the answer has begun, the turn has not ended
    term.type("\x03")
    assert term.exit_code() == 130
    thread_id = THREAD.search(term.out)
    assert thread_id and f"alpaca chat --thread {thread_id.group(0)}" in _plain(term.out)
    assert turns(db, thread_id.group(0)) == [(1, "succeeded"), (2, "succeeded"),
                                             (3, "queued")]  # handed back, journal kept

    again = Terminal(["--thread", thread_id.group(0)], env)
    again.expect("continuing turn 3")
    again.expect(r"you said: hello there / calc 6\*7 / a long message to interrupt")
    again.expect(r"you >")
    again.type("\x03")  # at the prompt
    assert again.exit_code() == 130
    resumed = Terminal(["--thread", thread_id.group(0)], env)
    resumed.expect(r"you >")
    resumed.type("/exit\r")
    assert resumed.exit_code() == 0
    assert turns(db, thread_id.group(0))[-1] == (3, "succeeded")

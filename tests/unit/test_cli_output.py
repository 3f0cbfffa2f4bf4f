"""What the command line prints for people: whole ids, honest labels, no Python reprs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from alpaca_engine.agents import Agent
from alpaca_engine.cli import app, upgrade_report
from alpaca_engine.engine import Engine
from alpaca_engine.examples_builtin import builder_models
from alpaca_engine.models.base import Message
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.render import approvals_table, print_table, runs_table, short
from alpaca_engine.store.migrations import SQLITE
from alpaca_engine.store.records import ApprovalRecord, RunRecord
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.worker import Worker
from alpaca_engine.workflow import Workflow
from tests.helpers import PATIENCE

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "alpaca_engine" / "examples_builtin" / "demo.yaml"
CHILD = "run_4cb44dbaf08a4f17.12"
APPROVAL = "apr_3a74e3c1d2b94f08"


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args))
        return result.exit_code, result.output

    return invoke


def _run(run_id: str = CHILD, agent: str = "notification") -> RunRecord:
    return RunRecord(id=run_id, tenant="local", agent=agent, workflow="builtin:demo",
                     input="x", created_at=1.8e9, updated_at=1.8e9, root_id=run_id,
                     depth=run_id.count("."), error_code="approval_rejected")


def _approval() -> ApprovalRecord:
    return ApprovalRecord(
        id=APPROVAL, tenant="local", run_id=CHILD, root_id=CHILD.split(".")[0], step=2,
        action="notify_slack", kind="tool", reason="tool 'notify_slack' requires approval",
        arguments={"channel": "#eu-launch", "text": "Decision: GO for the EU launch " * 3},
        created_at=1.8e9, status="rejected", decided_by="demo-supervisor")


def _draw(table: Any, *, width: int, terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system=None)
    print_table(console, table)
    return out.getvalue()


# -- ids are never cut --------------------------------------------------------------------------


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
def test_tables_never_cut_an_id_at_80_columns(terminal: bool) -> None:
    runs = [_run(), _run(CHILD.split(".")[0], "orchestrator")]
    drawn = _draw(runs_table(runs), width=80, terminal=terminal)
    assert CHILD in drawn and "…" not in drawn
    drawn = _draw(approvals_table([_approval()], 80 if terminal else None), width=80,
                  terminal=terminal)
    assert APPROVAL in drawn and CHILD in drawn


def test_a_narrow_terminal_hides_columns_and_says_which() -> None:
    drawn = _draw(approvals_table([_approval()], 80), width=80, terminal=True)
    assert "hidden at this width: reason, status, decided by" in drawn
    assert "notify_slack" in drawn and "#eu-launch" in drawn
    assert all(len(line) <= 80 for line in drawn.splitlines())
    wide = _draw(approvals_table([_approval()], 200), width=200, terminal=True)
    assert "hidden" not in wide and "demo-supervisor" in wide


def test_piped_tables_keep_each_row_on_one_line() -> None:
    drawn = _draw(approvals_table([_approval()]), width=80, terminal=False)
    [_header, row] = drawn.splitlines()
    assert row.split()[:3] == [APPROVAL, CHILD, "notify_slack"] and "demo-supervisor" in row


def test_short_never_cuts_inside_an_id() -> None:
    text = f'{{"agent": "search", "run_id": "{CHILD}", "output": "a long answer"}}'
    assert CHILD in short(text, 40)
    assert short(text, 40).endswith("…")
    assert short("x" * 100, 10) == "x" * 9 + "…"


def test_piped_cli_lists_show_whole_ids(tmp_path: Path) -> None:
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/p.db", "COLUMNS": "80"}
    alpaca = [sys.executable, "-m", "alpaca_engine"]
    demo = subprocess.run([*alpaca, "demo", "--json"], env=env, capture_output=True,
                          text=True, timeout=PATIENCE, stdin=subprocess.DEVNULL, check=True)
    root = json.loads(demo.stdout)["id"]
    listed = subprocess.run([*alpaca, "runs", "list"], env=env, capture_output=True,
                            text=True, timeout=PATIENCE, check=True).stdout
    for child in (f"{root}.2", f"{root}.4", f"{root}.6", f"{root}.8"):
        assert child in listed
    approvals = subprocess.run([*alpaca, "approvals", "list", "--all"], env=env,
                               capture_output=True, text=True, timeout=PATIENCE,
                               check=True).stdout
    assert f"{root}.8" in approvals and "apr_" in approvals and "apr_…" not in approvals


# -- --help ---------------------------------------------------------------------------------------


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        if hasattr(command, "commands"):
            found += _commands(command, path)
        else:
            found.append(path)
    return found


def test_help_shows_no_type_beside_flags(cli) -> None:  # type: ignore[no-untyped-def]
    commands = _commands(typer.main.get_command(app))
    assert ("demo",) in commands and ("runs", "list") in commands
    for path in commands:
        code, out = cli(*path, "--help")
        assert code == 0, path
        assert "<bool>" not in out, f"alpaca {' '.join(path)} --help: {out}"
    code, out = cli("runs", "list", "--help")
    assert "<int>" in out  # options that take a value still show it


# -- db upgrade -----------------------------------------------------------------------------------


def test_db_upgrade_says_what_it_applied(cli) -> None:  # type: ignore[no-untyped-def]
    versions = ", ".join(str(v) for v in range(1, len(SQLITE) + 1))
    code, out = cli("db", "upgrade")
    assert code == 0
    assert f"applied {len(SQLITE)} migrations ({versions}); schema now at version " \
           f"{len(SQLITE)}" in out
    code, out = cli("db", "upgrade")
    assert code == 0 and f"already at schema version {len(SQLITE)}; nothing to apply" in out
    assert upgrade_report((3,), 3) == "applied 1 migration (3); schema now at version 3"


# -- the demo's numbers say what they count -----------------------------------------------------


def test_demo_labels_the_run_and_the_tree_counts(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("demo")
    assert code == 0, out
    flat = " ".join(out.split())
    assert "this run only: 9 steps · 4 tool/delegation calls" in flat
    assert "budget used by the whole tree (5 runs): steps 21/60 · tool_calls 5/20" in flat


# -- a rejected approval reads as a sentence ----------------------------------------------------


def test_a_rejected_post_is_reported_as_a_sentence() -> None:
    rejected = {"error": {"code": "approval_rejected", "approval_id": APPROVAL,
                          "decided_by": "sue", "message": "notify_slack was rejected by sue: "
                                                          "not now"}}
    messages = [Message(role="user", content="Tell #eu-launch: Decision: GO"),
                Message(role="tool", name="notify_slack", tool_call_id="c",
                        content=json.dumps(rejected))]
    answer = builder_models.notification(messages, [])
    assert answer == ("Not posted: notify_slack was rejected by sue: not now "
                      "(approval_rejected).")


def test_cli_rejection_flow_prints_no_python_dict(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("run", str(DEMO), "--agent", "orchestrator", "--input", "Launch?")
    assert code == 3, out
    code, out = cli("approvals", "list", "--json")
    [pending] = json.loads(out)
    code, out = cli("approvals", "reject", pending["id"], "-m", "not now")
    assert code == 0
    code, out = cli("runs", "resume", pending["root_id"])
    assert code == 0, out
    assert "{'" not in out and "rejected by" in " ".join(out.split())


# -- the worker says what it does with runs -----------------------------------------------------


_release = asyncio.Event()


@tool()
async def hold() -> str:
    """Wait until released."""
    await _release.wait()
    return "released"


def _worker_workflow() -> Workflow:
    quick = Agent(name="quick", model=ScriptedModel(["done"]))
    slow = Agent(name="slow", model=ScriptedModel([{"tool": "hold", "args": {}}, "x"]),
                 tools=["hold"])
    return Workflow(ref="w", agents={"quick": quick, "slow": slow},
                    tools=ToolRegistry([hold]))


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(str(getattr(r, "event", "")), str(getattr(r, "run_id", ""))) for r in caplog.records
            if r.name == "alpaca.worker" and getattr(r, "event", None)]


async def test_worker_logs_claimed_finished_and_released(store, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="alpaca.worker")
    wf = _worker_workflow()
    engine = Engine(store, lambda ref: wf)
    quick = await engine.submit(wf, "quick", "go")
    await Worker(engine, concurrency=1).run(until_idle=True)
    assert _events(caplog) == [("run.claimed", quick.id), ("run.finished", quick.id)]
    finished = next(r for r in caplog.records if getattr(r, "event", "") == "run.finished")
    assert finished.state == "succeeded" and finished.duration_s >= 0  # type: ignore[attr-defined]

    caplog.clear()
    slow = await engine.submit(wf, "slow", "go")
    worker = Worker(engine, concurrency=1, drain_timeout=0.05)
    running = asyncio.create_task(worker.run())
    deadline = time.monotonic() + PATIENCE
    while (await store.get_run(slow.id)).state != "running":
        assert time.monotonic() < deadline, "the worker never claimed the run"
        await asyncio.sleep(0.05)
    worker.stop()
    await asyncio.wait_for(running, timeout=PATIENCE)
    assert ("run.claimed", slow.id) in _events(caplog)
    assert ("run.released", slow.id) in _events(caplog)
    assert (await store.get_run(slow.id)).state == "queued"

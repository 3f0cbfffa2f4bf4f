"""The command line as a user drives it (in-process through Typer's runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alpaca_engine.cli import app
from alpaca_engine.store.migrations import SQLITE

ROOT = Path(__file__).resolve().parents[2]
NOTES = ROOT / "examples" / "notes" / "workflow.yaml"


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args))
        return result.exit_code, result.output

    return invoke


def test_demo_shows_tree_gate_budget_and_answer(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("demo")
    assert code == 0, out
    for agent in ("search", "research", "decision", "notification"):
        assert f"delegates to {agent}" in out
    assert "web_search" in out and "fetch_page" in out and "notify_slack" in out
    assert "needs approval" in out and "demo's own supervisor" in out
    assert "budget used by the whole tree (5 runs): steps 21/60 · tool_calls 5/20" in out
    assert "Slack #eu-launch: Decision: GO" in out
    assert "audit: 5/5 chains verified" in out
    assert "succeeded" in out


def test_demo_json_and_runs_commands(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("demo", "--json")
    run = json.loads(out)
    assert code == 0 and run["state"] == "succeeded" and run["audit_ok"] is True
    assert run["budget_used"]["tool_calls"] == 5 and len(run["slack_posts"]) == 1
    code, out = cli("runs", "list", "--json")
    listed = json.loads(out)
    assert len(listed) == 5 and all(r["state"] == "succeeded" for r in listed)
    assert {r["root_id"] for r in listed} == {run["id"]}
    code, out = cli("approvals", "list", "--all", "--json")
    [approval] = json.loads(out)
    assert approval["status"] == "approved" and approval["decided_by"] == "demo-supervisor"
    assert approval["action"] == "notify_slack"
    code, out = cli("approvals", "list")
    assert code == 0 and approval["id"] not in out  # nothing pending
    code, out = cli("runs", "list")
    assert run["id"] in out
    code, out = cli("runs", "show", run["id"], "--json")
    shown = json.loads(out)
    assert len(shown["steps"]) == 9 and len(shown["tree"]) == 5
    code, out = cli("runs", "show", run["id"])
    assert code == 0 and "notification" in out and "delegate_to_research" in out
    code, out = cli("runs", "resume", run["id"])
    assert code == 0 and "succeeded" in out
    code, out = cli("runs", "cancel", run["id"])
    assert code == 0 and "succeeded" in out  # terminal runs stay as they are


def test_run_example_and_exit_codes(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("run", str(NOTES), "--agent", "researcher", "--input",
                    "What does a report cost in pricing?")
    assert code == 0, out
    assert "0.000528 USD" in out
    code, out = cli("run", str(NOTES), "--agent", "researcher", "--input", "pricing",
                    "--max-tool-calls", "1", "--json")
    assert code == 1 and json.loads(out)["error_code"] == "budget_exceeded"
    code, out = cli("run", str(NOTES), "--agent", "nobody", "--input", "x")
    assert code == 1 and "unknown agent" in out


def test_workflow_errors_name_file_and_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nagents:\n  - name: a\n    model: {provider: nope}\n")
    code, out = cli("run", str(bad), "--agent", "a", "--input", "x")
    assert code == 1
    assert "bad.yaml:4" in out and "agents[0].model" in out


def test_tools_and_agents_list(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("tools", "list", "--json")
    tools = {t["name"]: t for t in json.loads(out)}
    assert code == 0 and tools["notify_slack"]["approval"] == "required"
    assert tools["fetch_page"]["capabilities"] == ["net:fetch"]
    code, out = cli("tools", "list", "--json", "--workflow", "builtin:quickstart")
    tools = {t["name"]: t for t in json.loads(out)}
    assert tools["days_between"]["input_schema"]["required"] == ["start", "end"]
    code, out = cli("tools", "list", "--workflow", str(NOTES))
    assert code == 0 and "calculate" in out
    code, out = cli("agents", "list", "--json")
    agents = {a["name"]: a for a in json.loads(out)}
    assert agents["orchestrator"]["delegates_to"] == [
        "search", "research", "decision", "notification"]
    code, out = cli("agents", "list", "--workflow", str(NOTES))
    assert "researcher-gpt" in out
    code, out = cli("tools", "list", "--workflow", "/nonexistent.yaml")
    assert code == 1


def test_db_upgrade_doctor_and_missing_run(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("db", "upgrade")
    assert code == 0 and f"version {len(SQLITE)}" in out
    code, out = cli("doctor")
    assert code == 0 and "orphaned runs: 0" in out
    code, out = cli("doctor", "--json")
    assert json.loads(out)["orphan_count"] == 0
    code, out = cli("runs", "show", "run_missing")
    assert code == 1 and "not found" in out


def test_worker_until_idle_executes_queued_runs(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from alpaca_engine.engine import Engine
    from alpaca_engine.store.sqlite import SQLiteStore
    from alpaca_engine.workflows.loader import resolve_workflow

    async def submit() -> str:
        store = SQLiteStore(f"sqlite:///{tmp_path}/cli.db")
        await store.open()
        wf = resolve_workflow("builtin:quickstart")
        run = await Engine(store, resolve_workflow).submit(wf, "researcher", "launch?")
        await store.close()
        return run.id

    run_id = asyncio.run(submit())
    code, out = cli("worker", "--until-idle", "--concurrency", "2")
    assert code == 0
    code, out = cli("runs", "show", run_id, "--json")
    assert code == 0 and json.loads(out)["run"]["state"] == "succeeded"


def test_help_lists_the_commands(cli) -> None:  # type: ignore[no-untyped-def]
    code, out = cli("--help")
    assert code == 0
    for command in ("demo", "run", "runs", "worker", "tools", "agents", "db", "doctor"):
        assert command in out

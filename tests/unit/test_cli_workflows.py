"""`alpaca workflows` against the local store: push, validate, list, show, graph."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alpaca_engine.cli import app

WORKFLOW = textwrap.dedent("""
    version: 1
    name: triage
    tools:
      - python: "alpaca_engine.toolkit:notify_slack"
    agents:
      - name: boss
        model: {provider: scripted, script: [done]}
        delegates_to: [helper]
      - name: helper
        model: {provider: scripted, script: [done]}
        tools: [notify_slack]
""").lstrip("\n")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("ALPACA_URL", raising=False)
    (tmp_path / "wf.yaml").write_text(WORKFLOW)
    return tmp_path


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["workflows", *args])
    return result.exit_code, result.stdout, result.stderr


def test_push_twice_list_show_and_graph(folder: Path) -> None:
    wf = str(folder / "wf.yaml")
    assert cli("push", wf)[:2] == (0, "pushed triage version 1 (registry:triage@1)\n")
    code, out, _ = cli("push", wf)
    assert code == 0 and "already has this content" in out
    (folder / "wf.yaml").write_text(WORKFLOW.replace("[done]}\n    delegates_to",
                                                     "[ok]}\n    delegates_to"))
    code, out, _ = cli("push", wf, "--json")
    pushed = json.loads(out)
    assert (code, pushed["version"], pushed["created"]) == (0, 2, True)
    code, out, _ = cli("list", "--json")
    assert [(w["name"], w["version"]) for w in json.loads(out)] == [
        ("triage", 2), ("builtin:demo", None), ("builtin:quickstart", None)]
    code, out, _ = cli("show", "triage")
    assert code == 0 and "latest version 2 (agents: boss, helper)" in out
    assert cli("show", "triage@1")[1] == WORKFLOW
    code, out, _ = cli("graph", "triage@1", "--json")
    edges = {(e["kind"], e["source"], e["target"]) for e in json.loads(out)["edges"]}
    assert ("gated", "agent:helper", "tool:notify_slack") in edges
    code, out, _ = cli("graph", "triage")
    assert code == 0 and "→ delegates to helper" in out and "gated: notify_slack" in out
    code, out, _ = cli("graph", "builtin:demo")
    assert code == 0 and "roots: orchestrator" in out
    code, _, err = cli("show", "triage@9")
    assert code == 1 and "version 9 of workflow 'triage' not found" in err
    code, _, err = cli("show", "../etc")
    assert code == 1 and "is not NAME or NAME@VERSION" in err


def test_validate_and_push_print_every_error_with_its_line(folder: Path) -> None:
    bad = folder / "bad.yaml"
    bad.write_text(WORKFLOW.replace('"alpaca_engine.toolkit:notify_slack"', '"os:system"')
                   .replace("tools: [notify_slack]", "tools: [system]\n    "
                            "instructions: 'key sk-abcdefghijklmnop1234'"))
    code, _, err = cli("validate", str(bad))
    assert code == 1
    lines = err.splitlines()
    assert lines == [
        f"error {bad}:12: agents[1].instructions: looks like a secret (an API key, token or "
        "webhook URL): reference it as ${NAME}, never write it into a workflow",
        f"error {bad}:4: tools[0].python: 'os:system' is not in this server's tool catalog (GET "
        "/v1/tools lists it): a registered workflow cannot bring Python code; use a catalog "
        "tool, an HTTP tool or an MCP server over HTTP",
        f"{bad}: 2 error(s)"]
    code, _, err = cli("push", str(bad))
    assert code == 1 and "nothing was stored" in err and "tools[0].python" in err
    code, out, _ = cli("list", "--json")
    assert [w["kind"] for w in json.loads(out)] == ["served", "served"]
    code, out, _ = cli("validate", str(folder / "wf.yaml"), "--json")
    assert code == 0 and json.loads(out)["valid"]

"""`alpaca audit verify` catches a record edited, removed or reordered in the database file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alpaca_engine.cli import app


@pytest.fixture
def demo_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    db = tmp_path / "audit.db"
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.output
    return db, json.loads(result.output)["id"]


def verify(run_id: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", run_id])
    return result.exit_code, result.output


def test_intact_chain_verifies(demo_run: tuple[Path, str]) -> None:
    _db, run_id = demo_run
    code, out = verify(run_id)
    assert code == 0 and "chain intact" in out
    result = CliRunner().invoke(app, ["audit", "verify", run_id, "--tree", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)[0]["ok"] is True


def test_hand_edited_record_is_caught(demo_run: tuple[Path, str]) -> None:
    db, run_id = demo_run
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT seq, data FROM audit WHERE run_id=? AND kind='model.output' "
                           "ORDER BY seq LIMIT 1", (run_id,)).fetchone()
        data = json.loads(row[1])
        data["tool_calls"][0]["name"] = "delete_everything"
        conn.execute("UPDATE audit SET data=? WHERE run_id=? AND seq=?",
                     (json.dumps(data), run_id, row[0]))
    code, out = verify(run_id)
    assert code == 1
    assert f"first bad record seq {row[0]}" in out and "edited" in out


def test_removed_and_reordered_records_are_caught(demo_run: tuple[Path, str]) -> None:
    db, run_id = demo_run
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE run_id=? AND seq=5", (run_id,))
    code, out = verify(run_id)
    assert code == 1 and "seq 5" in out and "removed" in out
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit SET seq=-1 WHERE run_id=? AND seq=3", (run_id,))
        conn.execute("UPDATE audit SET seq=3 WHERE run_id=? AND seq=4", (run_id,))
        conn.execute("UPDATE audit SET seq=4 WHERE run_id=? AND seq=-1", (run_id,))
    code, out = verify(run_id)
    assert code == 1 and "first bad record seq 3" in out


def test_export_writes_json_lines(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    _db, run_id = demo_run
    result = CliRunner().invoke(app, ["audit", "export", run_id])
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[0]["kind"] == "run.created" and records[-1]["kind"] == "state.changed"
    out = tmp_path / "audit.jsonl"
    result = CliRunner().invoke(app, ["audit", "export", run_id, "-o", str(out)])
    assert result.exit_code == 0 and len(out.read_text().splitlines()) == len(records)


def test_keyed_chain_needs_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    monkeypatch.setenv("ALPACA_AUDIT_KEY", "server-secret-1")
    run_id = json.loads(CliRunner().invoke(app, ["demo", "--json"]).output)["id"]
    assert verify(run_id)[0] == 0
    monkeypatch.setenv("ALPACA_AUDIT_KEY", "a-different-key")
    code, out = verify(run_id)
    assert code == 1 and "first bad record seq 1" in out

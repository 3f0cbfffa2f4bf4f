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


# -- loss is tampering: the run row's chain head (DESIGN §7) -------------------------------------


def _last_seq(db: Path, run_id: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT MAX(seq) FROM audit WHERE run_id=?",
                                (run_id,)).fetchone()[0])


@pytest.fixture(params=[None, "server-secret-1"], ids=["unkeyed", "keyed"])
def any_key_run(request: pytest.FixtureRequest, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    db = tmp_path / "audit.db"
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("COLUMNS", "200")
    if request.param is not None:
        monkeypatch.setenv("ALPACA_AUDIT_KEY", request.param)
    result = CliRunner().invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.output
    return db, json.loads(result.output)["id"]


def test_records_deleted_from_the_end_are_caught(any_key_run: tuple[Path, str]) -> None:
    db, run_id = any_key_run
    last = _last_seq(db, run_id)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE run_id=? AND seq>=?", (run_id, last - 2))
    code, out = verify(run_id)
    assert code == 1
    assert f"first bad record seq {last - 2}" in out and "deleted" in out


def test_a_finished_runs_whole_chain_deleted_is_caught(any_key_run: tuple[Path, str]) -> None:
    db, run_id = any_key_run
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE run_id=?", (run_id,))
    code, out = verify(run_id)
    assert code == 1 and "first bad record seq 1" in out and "missing" in out


def test_the_terminal_record_deleted_is_caught(any_key_run: tuple[Path, str]) -> None:
    db, run_id = any_key_run
    last = _last_seq(db, run_id)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE run_id=? AND seq=?", (run_id, last))
    code, out = verify(run_id)
    assert code == 1 and f"first bad record seq {last}" in out


def test_a_tail_deleted_with_its_head_rewritten_is_caught(any_key_run: tuple[Path, str]) -> None:
    """Whoever also moves the head back cannot make the chain end in the terminal record."""
    db, run_id = any_key_run
    last = _last_seq(db, run_id)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE run_id=? AND seq=?", (run_id, last))
        conn.execute("UPDATE runs SET audit_seq=?, audit_hash=(SELECT hash FROM audit WHERE "
                     "run_id=? AND seq=?) WHERE id=?", (last - 1, run_id, last - 1, run_id))
    code, out = verify(run_id)
    assert code == 1 and f"first bad record seq {last}" in out
    assert "does not end with the state change to succeeded" in out
    result = CliRunner().invoke(app, ["audit", "verify", run_id, "--json"])
    [entry] = json.loads(result.output)
    assert entry["ok"] is False and entry["first_bad_seq"] == last and entry["head_seq"] == last - 1


def test_a_key_with_surrounding_whitespace_is_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_DATABASE_URL", f"sqlite:///{tmp_path}/k.db")
    monkeypatch.setenv("ALPACA_AUDIT_KEY", "server-secret-1\n")  # as read from a file
    run_id = json.loads(CliRunner().invoke(app, ["demo", "--json"]).output)["id"]
    for spelling in ("server-secret-1", "  server-secret-1 \n", "\tserver-secret-1"):
        monkeypatch.setenv("ALPACA_AUDIT_KEY", spelling)
        assert verify(run_id)[0] == 0, spelling
    monkeypatch.setenv("ALPACA_AUDIT_KEY", "server-secret-2")
    assert verify(run_id)[0] == 1


def test_verify_all_sweeps_every_run_and_summarises(demo_run: tuple[Path, str]) -> None:
    db, run_id = demo_run
    with sqlite3.connect(db) as conn:
        total = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        child = conn.execute("SELECT id FROM runs WHERE parent_id IS NOT NULL ORDER BY id "
                             "LIMIT 1").fetchone()[0]
    assert total > 1
    result = CliRunner().invoke(app, ["audit", "verify", "--all"])
    assert result.exit_code == 0, result.output
    assert f"checked {total} runs: {total} ok" in result.output
    child_last = _last_seq(db, child)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM audit WHERE run_id=? AND seq=?", (child, child_last))
        conn.execute("DELETE FROM audit WHERE run_id=?", (run_id,))
    result = CliRunner().invoke(app, ["audit", "verify", "--all"])
    assert result.exit_code == 1
    assert f"checked {total} runs: {total - 2} ok, 2 bad" in result.output
    assert f"TAMPERED {child}: first bad record seq {child_last}" in result.output
    assert f"TAMPERED {run_id}: first bad record seq 1" in result.output
    result = CliRunner().invoke(app, ["audit", "verify", "--all", "--json"])
    summary = json.loads(result.output)
    assert result.exit_code == 1
    assert (summary["checked"], summary["ok"], summary["bad"]) == (total, total - 2, 2)
    assert {f["run_id"]: f["first_bad_seq"] for f in summary["failures"]} == {
        child: child_last, run_id: 1}


def test_verify_needs_a_run_or_all(demo_run: tuple[Path, str]) -> None:
    _db, run_id = demo_run
    for args in ([], [run_id, "--all"]):
        result = CliRunner().invoke(app, ["audit", "verify", *args])
        assert result.exit_code == 1 and "give a RUN_ID or --all" in result.output
        assert "Traceback" not in result.output

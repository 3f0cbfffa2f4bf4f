"""`alpaca threads list|show|fork|delete` on the local store, and `alpaca audit verify` of a
deleted thread's run ("deleted, anchored")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alpaca_engine.cli import app
from alpaca_engine.engine import Engine
from alpaca_engine.store.records import RunRecord, ThreadRecord
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.workflows.loader import resolve_workflow


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ThreadRecord,
                                                                       list[RunRecord]]:
    url = f"sqlite:///{tmp_path}/threads.db"
    monkeypatch.setenv("ALPACA_DATABASE_URL", url)
    monkeypatch.setenv("COLUMNS", "200")

    async def make() -> tuple[ThreadRecord, list[RunRecord]]:
        store = SQLiteStore(url)
        await store.open()
        try:
            engine = Engine(store, resolve_workflow)
            made = await engine.create_thread(agent="researcher", workflow="builtin:quickstart",
                                              title="Launch", tenant="acme")
            runs = [await engine.chat(made.id, text, tenant="acme")
                    for text in ("When did we launch?", "And how many days were left?")]
            return made, runs
        finally:
            await store.close()

    return asyncio.run(make())


def test_list_and_show(thread: tuple[ThreadRecord, list[RunRecord]]) -> None:
    made, runs = thread
    code, out = invoke("threads", "list", "--json")
    assert code == 0, out
    [item] = json.loads(out)
    assert (item["id"], item["turns"], item["last_state"], item["title"]) == (
        made.id, 2, "succeeded", "Launch")
    assert json.loads(invoke("threads", "list", "--json", "--tenant", "other")[1]) == []
    code, out = invoke("threads", "list")
    assert code == 0 and made.id in out and "Launch" in out
    code, out = invoke("threads", "show", made.id, "--json")
    shown = json.loads(out)
    assert shown["thread"]["agent"] == "researcher"
    assert [(m["turn"], m["run_id"], m["content"]) for m in shown["messages"]] == [
        (1, runs[0].id, "When did we launch?"), (2, runs[1].id, "And how many days were left?")]
    assert shown["messages"][1]["answer"] == runs[1].output
    code, out = invoke("threads", "show", made.id)
    assert code == 0 and runs[1].id in out and "And how many days were left?" in out


def test_fork_and_its_errors(thread: tuple[ThreadRecord, list[RunRecord]]) -> None:
    made, _runs = thread
    code, out = invoke("threads", "fork", made.id, "--turn", "1", "--json")
    assert code == 0, out
    fork = json.loads(out)
    assert (fork["forked_from"], fork["forked_turn"], fork["tenant"]) == (made.id, 1, "acme")
    code, out = invoke("threads", "show", fork["id"], "--json")
    assert len(json.loads(out)["messages"]) == 1
    code, out = invoke("threads", "fork", made.id, "--turn", "5")
    assert code == 1 and out.count("\n") == 1 and "has 2 turn(s)" in out
    code, out = invoke("threads", "fork", "thr_nope", "--turn", "1")
    assert code == 1 and "thread thr_nope not found" in out


def test_delete_then_verify_says_deleted_anchored(
        thread: tuple[ThreadRecord, list[RunRecord]]) -> None:
    made, runs = thread
    code, out = invoke("threads", "delete", made.id, "--json")
    assert code == 0, out
    gone = json.loads(out)
    assert gone["erased_runs"] == 2 and gone["anchor_seq"] == 4
    code, out = invoke("audit", "verify", runs[0].id)
    assert code == 0, out
    assert f"deleted with thread {made.id}, anchored" in out and "record 4" in out
    code, out = invoke("audit", "verify", runs[1].id, "--json")
    [checked] = json.loads(out)
    assert checked["ok"] and checked["deleted_with"] == made.id and checked["anchor_seq"] == 4
    code, out = invoke("audit", "verify", "--all")
    assert code == 0 and "all chains intact" in out
    code, out = invoke("threads", "show", made.id)
    assert code == 1 and "not found" in out
    code, out = invoke("threads", "delete", made.id)
    assert code == 1 and "not found" in out

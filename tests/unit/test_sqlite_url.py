"""``sqlite:///file?synchronous=full``: a sync to disk at every commit, asked for in the URL."""

from __future__ import annotations

import glob
import sqlite3
from pathlib import Path

import pytest

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.sqlite_url import BadSqliteUrl, SqliteUrl, parse_sqlite_url
from alpaca_engine.store.factory import make_store
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

FULL, NORMAL = 2, 1  # what PRAGMA synchronous reads back


@pytest.mark.parametrize(("url", "parsed"), [
    ("sqlite:///./alpaca.db", SqliteUrl("./alpaca.db")),
    ("sqlite:////abs/a.db?synchronous=full", SqliteUrl("/abs/a.db", "full")),
    ("sqlite:///a.db?synchronous=Full", SqliteUrl("a.db", "full")),
    ("sqlite:///a.db?synchronous=normal", SqliteUrl("a.db")),
    ("sqlite:///a.db?", SqliteUrl("a.db")),
    ("sqlite:///:memory:", SqliteUrl(":memory:")),
    ("sqlite://", SqliteUrl(":memory:")),
    ("sqlite:///:memory:?synchronous=full", SqliteUrl(":memory:", "full")),
])
def test_the_file_and_its_synchronous_mode(url: str, parsed: SqliteUrl) -> None:
    assert parse_sqlite_url(url) == parsed


@pytest.mark.parametrize("url", ["sqlite:///a.db?synchronous=", "sqlite:///a.db?mode=ro",
                                 "sqlite:///a.db?synchronous=full&x=1", "sqlite://a.db"])
def test_a_bad_url_names_cause_and_fix(url: str) -> None:
    with pytest.raises(BadSqliteUrl) as e:
        parse_sqlite_url(url)
    assert e.value.cause and e.value.fix and "\n" not in str(e.value)


@pytest.mark.parametrize(("query", "expected"), [("", NORMAL), ("?synchronous=full", FULL),
                                                 ("?synchronous=normal", NORMAL)])
async def test_every_connection_of_the_store_uses_it(tmp_path: Path, query: str,
                                                     expected: int) -> None:
    path = tmp_path / "a.db"
    store = make_store(f"sqlite:///{path}{query}")
    assert isinstance(store, SQLiteStore)
    await store.open()
    try:
        assert store.path == str(path)  # the query is not part of the file name
        assert store._db is not None and store._writer is not None
        for conn in (store._db, store._writer[1]):  # the loop's and the writer thread's
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == expected
    finally:
        await store.close()
    assert sorted(glob.glob("*.db", root_dir=tmp_path)) == ["a.db"]  # no file named by the query


async def test_a_run_on_a_fully_synchronous_file_is_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'full.db'}?synchronous=full"
    agent = Agent(name="a", model=ScriptedModel(["hello"]))
    workflow = Workflow(ref="t:full", agents={"a": agent}, tools=ToolRegistry([]))
    store = make_store(url)
    await store.open()
    try:
        record = await Engine(store, lambda ref: workflow).run(workflow, "a", "hi")
    finally:
        await store.close()
    assert record.state == RunState.SUCCEEDED
    with sqlite3.connect(tmp_path / "full.db") as conn:
        assert conn.execute("SELECT state, output FROM runs").fetchone() == ("succeeded",
                                                                             "hello")

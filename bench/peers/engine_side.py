"""The engine's rows of the peers bench; runs in the project's environment (``uv run``).

One child process per (row, workload): ``memory`` (``SQLiteStore`` on ``:memory:``),
``sqlite`` (a WAL file, ``synchronous=NORMAL``) or ``postgresql`` (a ``PostgresStore`` in a
fresh schema of the database the driver created for this child). One store and one Engine
serve every run of the child; the model is a ``FunctionModel`` following the shared rule in
``common.Workload``; the tool is an ``async def noop(x: int) -> int``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.lifecycle import RunState
from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptItem
from alpaca_engine.store.base import Store
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

ROWS = ["memory", "sqlite", "postgresql"]
CONVERSATION_HEAD = 1
"""Messages before the first model call: the user's input (the agent has no instructions)."""


@tool
async def noop(x: int) -> int:
    """Return the argument unchanged."""
    return common.WORK.tool(x)


async def model_fn(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> ScriptItem:
    x = await common.WORK.model_turn((len(messages) - CONVERSATION_HEAD) // 2)
    return "done" if x is None else {"tool": "noop", "args": {"x": x}}


def make_workflow(max_turns: int) -> Workflow:
    agent = Agent(name="looper", model=FunctionModel(model_fn), tools=["noop"],
                  max_steps=max_turns + 5)
    return Workflow(ref="bench:peers", agents={"looper": agent}, tools=ToolRegistry([noop]))


def make_store(row: str, workdir: Path, database_url: str | None) -> Store:
    if row == "memory":
        return SQLiteStore("sqlite:///:memory:")
    if row == "sqlite":
        return SQLiteStore(f"sqlite:///{workdir / 'engine.db'}")
    if database_url is None:
        raise SystemExit("postgresql: --database-url is required")
    from alpaca_engine.store.postgres import PostgresStore

    return PostgresStore(database_url, schema=f"alpaca_bench_{uuid.uuid4().hex[:12]}")


@contextlib.asynccontextmanager
async def open_row(row: str, workdir: Path, database_url: str | None,
                   max_turns: int) -> AsyncIterator[common.RunOnce]:
    store = make_store(row, workdir, database_url)
    await store.open()
    try:
        workflow = make_workflow(max_turns)
        engine = Engine(store, lambda ref: workflow)

        async def run_once(run_id: int) -> object:
            record = await engine.run(workflow, "looper", "loop")
            if record.state != RunState.SUCCEEDED:
                raise RuntimeError(f"run ended {record.state}: {record.error_code} "
                                   f"{record.error_message}")
            return record

        yield run_once
    finally:
        await store.close()


async def main_async(argv: list[str] | None = None) -> int:
    args = common.child_parser(ROWS).parse_args(argv)
    max_turns = max([int(t) for t in args.turns.split(",") if t.strip()] + [args.model_calls])
    async with open_row(args.row, Path(args.workdir), args.database_url, max_turns) as run_once:
        result = await common.run_workload(args, run_once)
    import alpaca_engine

    result["version"] = getattr(alpaca_engine, "__version__", "checkout")
    common.emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main_async()))

"""The peers' rows of the peers bench; runs in ``bench/peers/.venv`` (never the project's lock).

One child process per (row, workload). Every row builds the same agent: a model that follows
``common.Workload`` (one ``noop`` call per turn, then a final answer), the framework's own
way of declaring the tool ``noop(x: int) -> int``, and the framework's own loop running them.
Frameworks are imported only inside their row, so one that fails to import fails alone.

``python peer_side.py --probe`` prints, per row, the installed version or why it cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

WORK = common.WORK
Opener = Callable[[Any], contextlib.AbstractAsyncContextManager[common.RunOnce]]


def sqlite_like_engine(conn: Any) -> None:
    """Give a peer's SQLite connection the engine's settings (WAL, ``synchronous=NORMAL``), so
    both sides pay the same fsync policy; ``--sqlite-defaults`` skips this."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")


# --- LangGraph -----------------------------------------------------------------------------

def langgraph_app(checkpointer: Any) -> Any:
    """The ReAct loop as LangGraph documents it: a model node, the prebuilt ``ToolNode`` and
    ``tools_condition`` routing back to the model until it stops asking for tools."""
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    @tool
    async def noop(x: int) -> int:
        """Return the argument unchanged."""
        return WORK.tool(x)

    async def model(state: MessagesState) -> dict[str, Any]:
        # the conversation is [human, (ai, tool) * turn]
        x = await WORK.model_turn((len(state["messages"]) - 1) // 2)
        if x is None:
            return {"messages": [AIMessage(content="done")]}
        return {"messages": [AIMessage(content="", tool_calls=[
            {"name": "noop", "args": {"x": x}, "id": f"call_{x}", "type": "tool_call"}])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", model)
    graph.add_node("tools", ToolNode([noop]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=checkpointer)


def langgraph_runner(app: Any, durability: str | None) -> common.RunOnce:
    async def run_once(run_id: int) -> object:
        config = {"recursion_limit": 2 * WORK.tool_turns + 10,
                  "configurable": {"thread_id": f"run-{run_id}"}}
        kwargs = {"durability": durability} if durability else {}
        return await app.ainvoke({"messages": [("user", "loop")]}, config, **kwargs)

    return run_once


@contextlib.asynccontextmanager
async def open_langgraph(args: Any) -> AsyncIterator[common.RunOnce]:
    yield langgraph_runner(langgraph_app(None), None)


@contextlib.asynccontextmanager
async def open_langgraph_sqlite(args: Any) -> AsyncIterator[common.RunOnce]:
    """``AsyncSqliteSaver`` on a file. ``durability="sync"`` by default: each step's
    checkpoint is committed before the next step starts, the guarantee the engine's journal
    gives (LangGraph's own default, "async", writes it while the next step already runs)."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(Path(args.workdir) / "lg.db")) as saver:
        await saver.setup()
        if not args.sqlite_defaults:
            await saver.conn.execute("PRAGMA synchronous=NORMAL")
        yield langgraph_runner(langgraph_app(saver), args.langgraph_durability)


# --- Pydantic AI ---------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def open_pydantic_ai(args: Any) -> AsyncIterator[common.RunOnce]:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import UsageLimits

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        # the history is [request(user), (response, request(tool return)) * turn]
        x = await WORK.model_turn((len(messages) - 1) // 2)
        if x is None:
            return ModelResponse(parts=[TextPart("done")])
        return ModelResponse(parts=[ToolCallPart("noop", {"x": x}, tool_call_id=f"call_{x}")])

    agent = Agent(FunctionModel(model))

    @agent.tool_plain
    async def noop(x: int) -> int:
        """Return the argument unchanged."""
        return WORK.tool(x)

    limits = UsageLimits(request_limit=None)

    async def run_once(run_id: int) -> object:
        return await agent.run("loop", usage_limits=limits)

    yield run_once


# --- OpenAI Agents SDK ---------------------------------------------------------------------

@contextlib.asynccontextmanager
async def open_openai_agents(args: Any) -> AsyncIterator[common.RunOnce]:
    from agents import (
        Agent,
        Model,
        ModelResponse,
        RunConfig,
        Runner,
        Usage,
        function_tool,
        set_tracing_disabled,
    )
    from openai.types.responses import (
        ResponseFunctionToolCall,
        ResponseOutputMessage,
        ResponseOutputText,
    )

    set_tracing_disabled(True)

    class BenchModel(Model):
        """No network: answers from the shared rule."""

        async def get_response(self, system_instructions: Any, input: Any, *rest: Any,
                               **kwargs: Any) -> ModelResponse:
            # the input is [user, (function_call, function_call_output) * turn]
            items = [input] if isinstance(input, str) else input
            x = await WORK.model_turn((len(items) - 1) // 2)
            if x is None:
                out: list[Any] = [ResponseOutputMessage(
                    id="msg_done", type="message", role="assistant", status="completed",
                    content=[ResponseOutputText(type="output_text", text="done",
                                                annotations=[])])]
            else:
                out = [ResponseFunctionToolCall(
                    type="function_call", id=f"fc_{x}", call_id=f"call_{x}", name="noop",
                    arguments=json.dumps({"x": x}), status="completed")]
            return ModelResponse(output=out, usage=Usage(), response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the bench does not stream")

    @function_tool
    async def noop(x: int) -> int:
        """Return the argument unchanged."""
        return WORK.tool(x)

    agent = Agent(name="looper", model=BenchModel(), tools=[noop])
    config = RunConfig(tracing_disabled=True)

    async def run_once(run_id: int) -> object:
        return await Runner.run(agent, "loop", max_turns=WORK.tool_turns + 5,
                                run_config=config)

    yield run_once


# --- DBOS ----------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def open_dbos(args: Any, url: str) -> AsyncIterator[common.RunOnce]:
    """A durable workflow: one ``@DBOS.step`` per model call and one per tool call, each
    step's output checkpointed in the system database before the workflow goes on."""
    from dbos import DBOS

    DBOS(config={"name": "peers-bench", "system_database_url": url, "log_level": "WARNING"})

    @DBOS.step()
    async def model_step(conversation: list[dict[str, Any]]) -> dict[str, Any]:
        # the conversation is [user, (assistant, tool) * turn]
        x = await WORK.model_turn((len(conversation) - 1) // 2)
        if x is None:
            return {"role": "assistant", "content": "done"}
        return {"role": "assistant", "tool": "noop", "args": {"x": x}, "id": f"call_{x}"}

    @DBOS.step()
    async def noop_step(x: int) -> int:
        return WORK.tool(x)

    @DBOS.workflow()
    async def agent_loop(prompt: str) -> str:
        conversation: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        while True:
            reply = await model_step(conversation)
            conversation.append(reply)
            if "tool" not in reply:
                return str(reply["content"])
            result = await noop_step(**reply["args"])
            conversation.append({"role": "tool", "id": reply["id"], "content": result})

    DBOS.launch()
    try:
        async def run_once(run_id: int) -> object:
            return await agent_loop("loop")

        yield run_once
    finally:
        DBOS.destroy(destroy_registry=True)


@contextlib.asynccontextmanager
async def open_dbos_sqlite(args: Any) -> AsyncIterator[common.RunOnce]:
    if not args.sqlite_defaults:
        import sqlalchemy

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            if type(dbapi_conn).__module__.startswith("sqlite3"):
                sqlite_like_engine(dbapi_conn)

        sqlalchemy.event.listen(sqlalchemy.engine.Engine, "connect", on_connect)
    async with open_dbos(args, f"sqlite:///{Path(args.workdir) / 'dbos.db'}") as run_once:
        yield run_once


@contextlib.asynccontextmanager
async def open_dbos_postgresql(args: Any) -> AsyncIterator[common.RunOnce]:
    if not args.database_url:
        raise SystemExit("dbos-postgresql: --database-url is required")
    async with open_dbos(args, args.database_url) as run_once:
        yield run_once


ROWS: dict[str, tuple[str, Opener]] = {
    # row: (distribution whose version is reported, opener)
    "langgraph": ("langgraph", open_langgraph),
    "langgraph-sqlite": ("langgraph-checkpoint-sqlite", open_langgraph_sqlite),
    "pydantic-ai": ("pydantic-ai-slim", open_pydantic_ai),
    "openai-agents": ("openai-agents", open_openai_agents),
    "dbos-sqlite": ("dbos", open_dbos_sqlite),
    "dbos-postgresql": ("dbos", open_dbos_postgresql),
}
IMPORTS = {
    "langgraph": ["langgraph.graph", "langgraph.prebuilt", "langchain_core.messages"],
    "langgraph-sqlite": ["langgraph.checkpoint.sqlite.aio", "aiosqlite"],
    "pydantic-ai": ["pydantic_ai.models.function"],
    "openai-agents": ["agents", "openai.types.responses"],
    "dbos-sqlite": ["dbos"],
    "dbos-postgresql": ["dbos", "psycopg"],
}


def probe() -> dict[str, dict[str, str]]:
    """Per row: {"version": ...} when it imports, else {"reason": one line}."""
    import importlib

    out: dict[str, dict[str, str]] = {}
    for row, (dist, _opener) in ROWS.items():
        try:
            for name in IMPORTS[row]:
                importlib.import_module(name)
            out[row] = {"version": metadata.version(dist)}
        except Exception as exc:  # any import failure makes just this row unavailable
            out[row] = {"reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return out


async def main_async(argv: list[str]) -> int:
    args = common.child_parser(list(ROWS)).parse_args(argv)
    dist, opener = ROWS[args.row]
    async with opener(args) as run_once:
        result = await common.run_workload(args, run_once)
    result["version"] = metadata.version(dist)
    common.emit(result)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        common.emit(probe())
        raise SystemExit(0)
    raise SystemExit(asyncio.run(main_async(sys.argv[1:])))

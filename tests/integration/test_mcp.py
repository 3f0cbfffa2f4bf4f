"""MCP tools from a real server (a stdio subprocess, and streamable HTTP under uvicorn), loaded
from a workflow file and called through agent runs: the step gate governs them like any tool."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import mcp_types
import pytest
import uvicorn

from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.mcp import (
    MCPConfigError,
    MCPConnectionError,
    MCPServer,
    McpTool,
    MCPToolError,
    _result_value,
)
from alpaca_engine.workflow import Workflow
from alpaca_engine.workflows.loader import WorkflowError, load_workflow
from tests.helpers import PATIENCE, engine

SERVER = Path(__file__).with_name("mcp_server.py")


@pytest.fixture
async def store() -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore("sqlite:///:memory:")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def servers() -> AsyncIterator[list[Workflow]]:
    """Workflows whose MCP connections are closed (and servers stopped) after the test."""
    loaded: list[Workflow] = []
    yield loaded
    done: set[int] = set()
    for wf in loaded:
        for tool in wf.tools:
            if isinstance(tool, McpTool) and tool.server and id(tool.server) not in done:
                done.add(id(tool.server))
                await tool.server.close()


@pytest.fixture
def call_log(tmp_path: Path) -> Callable[[], list[dict[str, Any]]]:
    path = tmp_path / "calls.jsonl"

    def read() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    read.path = path  # type: ignore[attr-defined]
    return read


def write_workflow(tmp_path: Path, call_log: Any, script: list[Any], *,
                   mcp: str | None = None, entry: str = "", tools: str = '["files_*"]',
                   capabilities: str = "[fs:read]") -> Path:
    command = json.dumps([sys.executable, str(SERVER)])
    mcp = mcp or f"""
      server: files
      command: {command}
      env: {{MCP_TEST_CALL_LOG: {json.dumps(str(call_log.path))}}}"""
    text = f"""version: 1
tools:
  - mcp:{mcp}
    capabilities: [fs:read]{entry}
agents:
  - name: worker
    model:
      provider: scripted
      script: {json.dumps(script)}
    tools: {tools}
    capabilities: {capabilities}
"""
    path = tmp_path / "workflow.yaml"
    path.write_text(text)
    return path


def model_of(wf: Workflow) -> ScriptedModel:
    model = wf.agent("worker").model
    assert isinstance(model, ScriptedModel)
    return model


def tool_results(wf: Workflow) -> list[Any]:
    last = model_of(wf).calls[-1]
    return [json.loads(m.content or "null") for m in last if m.role == "tool"]


async def run(store: SQLiteStore, wf: Workflow) -> Any:
    record = await engine(store, wf).run(wf, "worker", "go")
    assert record.state == "succeeded", (record.error_code, record.error_message)
    return record


# -- stdio -------------------------------------------------------------------------------------


async def test_mcp_tools_load_with_the_servers_contracts(tmp_path, call_log, servers):
    wf = load_workflow(write_workflow(tmp_path, call_log, ["done"]))
    servers.append(wf)
    assert wf.tools.names() == ["files_add", "files_crash", "files_echo", "files_fail"]
    add = wf.tools.get("files_add")
    assert isinstance(add, McpTool)
    described = add.describe()
    assert described["source"] == "mcp"
    assert described["mcp"] == {"server": "files", "tool": "add", "transport": "stdio"}
    assert described["capabilities"] == ["fs:read"]
    assert described["description"] == "Add two integers."
    assert add.input_schema["required"] == ["a", "b"]
    assert add.output_schema is not None
    assert call_log() == []  # listing tools calls none of them


async def test_results_reach_the_model(tmp_path, call_log, store, servers):
    wf = load_workflow(write_workflow(tmp_path, call_log, [
        {"tool": "files_add", "args": {"a": 2, "b": 3}},
        {"calls": [{"tool": "files_echo", "args": {"text": "héllo"}},
                   {"tool": "files_add", "args": {"a": -1, "b": 1}}]},
        "done"]))
    servers.append(wf)
    record = await run(store, wf)
    assert tool_results(wf) == [{"result": 5}, {"result": "héllo"}, {"result": 0}]
    assert [c["tool"] for c in call_log()] == ["add", "echo", "add"]
    steps = await store.list_steps(record.id)
    assert [(s.name, s.status) for s in steps if s.kind == "tool"] == [
        ("files_add", "completed"), ("files_echo", "completed"), ("files_add", "completed")]


async def test_the_input_contract_is_enforced_before_the_server_is_called(
        tmp_path, call_log, store, servers):
    wf = load_workflow(write_workflow(tmp_path, call_log, [
        {"tool": "files_add", "args": {"a": "two", "b": 3}},
        {"tool": "files_add", "args": {"a": 1}},
        {"tool": "files_echo", "args": {"text": "still here"}},
        "done"]))
    servers.append(wf)
    await run(store, wf)
    bad_type, missing, ok = tool_results(wf)
    assert bad_type["error"]["code"] == "invalid_arguments"
    assert "/a" in bad_type["error"]["message"]
    assert missing["error"]["code"] == "invalid_arguments"
    assert ok == {"result": "still here"}
    assert call_log() == [{"tool": "echo", "args": {"text": "still here"}}]


async def test_an_mcp_error_result_is_a_tool_error(tmp_path, call_log, store, servers):
    wf = load_workflow(write_workflow(tmp_path, call_log, [
        {"tool": "files_fail", "args": {}}, "done"]))
    servers.append(wf)
    record = await run(store, wf)
    [result] = tool_results(wf)
    assert result["error"]["code"] == "tool_error"
    assert result["error"]["message"].startswith("MCPToolError: ")
    assert "fail" in result["error"]["message"]
    failed = [r for r in await store.list_audit(record.id) if r.kind == "tool.failed"]
    assert len(failed) == 1


@pytest.mark.parametrize(("tools", "capabilities", "rule"), [
    ('["files_add", "files_echo"]', "[fs:read]", "not in the agent's allowlist"),
    ('["files_*"]', "[net]", "needs capabilities not granted: fs:read"),
])
async def test_permission_is_checked_before_the_server_is_called(
        tmp_path, call_log, store, servers, tools, capabilities, rule):
    wf = load_workflow(write_workflow(tmp_path, call_log, [
        {"tool": "files_fail", "args": {}}, "done"], tools=tools, capabilities=capabilities))
    servers.append(wf)
    await run(store, wf)
    [result] = tool_results(wf)
    assert result["error"]["code"] == "permission_denied"
    assert rule in result["error"]["message"]
    assert call_log() == []


async def test_include_and_exclude_filter_the_servers_tools(tmp_path, call_log, servers):
    wf = load_workflow(write_workflow(tmp_path, call_log, ["done"],
                                      entry='\n    include: ["e*", "a*", "fail"]'
                                            '\n    exclude: ["fail"]'))
    servers.append(wf)
    assert wf.tools.names() == ["files_add", "files_echo"]


async def test_a_crashed_server_is_restarted_on_the_next_call(tmp_path, call_log, store,
                                                              servers):
    wf = load_workflow(write_workflow(tmp_path, call_log, [
        {"tool": "files_echo", "args": {"text": "before"}},
        {"tool": "files_crash", "args": {}},
        {"tool": "files_echo", "args": {"text": "after"}},
        "done"]))
    servers.append(wf)
    await run(store, wf)
    before, crashed, after = tool_results(wf)
    assert before == {"result": "before"} and after == {"result": "after"}
    assert crashed["error"]["code"] == "tool_error"
    assert "MCPConnectionError" in crashed["error"]["message"]


async def test_a_direct_server_object_lists_and_calls(call_log):
    server = MCPServer("direct", command=[sys.executable, str(SERVER)], prefix="d-")
    try:
        tools = {t.name: t for t in await server.list_tools()}
        assert "d-add" in tools
        assert await server.call_tool("add", {"a": 40, "b": 2}) == {"result": 42}
    finally:
        await server.close()


@pytest.mark.parametrize(("kwargs", "loc", "message"), [
    ({"command": ["x"], "url": "http://h/mcp"}, (), "either command"),
    ({}, (), "either command"),
    ({"command": []}, ("command",), "empty"),
    ({"url": "ftp://h/mcp"}, ("url",), "http://"),
    ({"url": "http://h/mcp", "env": {"A": "b"}}, (), "stdio servers"),
    ({"command": ["x"], "headers": {"A": "b"}}, ("headers",), "HTTP servers"),
    ({"command": ["x"], "env": {"T": "${T"}}, ("env", "T"), "malformed"),
    ({"command": ["x"], "prefix": "a.b"}, ("prefix",), "prefix"),
    ({"url": "http://h/mcp", "headers": {"X-Api-Key": "literal1"}}, ("headers", "X-Api-Key"),
     "looks like a secret"),
])
def test_server_definitions_that_cannot_work_are_refused(kwargs, loc, message):
    with pytest.raises(MCPConfigError) as info:
        MCPServer("files", **kwargs)
    assert info.value.loc == loc and message in info.value.message
    assert "literal1" not in str(info.value)
    with pytest.raises(MCPConfigError, match="server name"):
        MCPServer("bad name", command=["x"])


def test_tool_names_are_prefixed_cleaned_and_bounded():
    server = MCPServer("files", url="http://h/mcp",
                       headers={"Authorization": "Bearer ${ALPACA_TEST_MCP_TOKEN}"})
    assert server.tool_name("read_file") == "files_read_file"
    assert server.tool_name("fs.read/v2") == "files_fs_read_v2"
    long = server.tool_name("x" * 100)
    assert len(long) == 64 and long.startswith("files_xxx")
    assert long != server.tool_name("x" * 99)
    assert server.describe() == {
        "name": "files", "transport": "http", "prefix": "files_", "url": "http://h/mcp",
        "headers": {"Authorization": "<secret from ALPACA_TEST_MCP_TOKEN>"}}


def test_results_prefer_structured_content_then_text():
    text = mcp_types.TextContent(text="plain")
    image = mcp_types.ImageContent(data="aGk=", mime_type="image/png")
    assert _result_value(mcp_types.CallToolResult(
        content=[text], structured_content={"n": 1})) == {"n": 1}
    assert _result_value(mcp_types.CallToolResult(content=[text, text])) == "plain\nplain"
    mixed = _result_value(mcp_types.CallToolResult(content=[text, image]))
    assert [block["type"] for block in mixed["content"]] == ["text", "image"]
    with pytest.raises(MCPToolError, match="plain"):
        _result_value(mcp_types.CallToolResult(content=[text], is_error=True))


async def test_a_missing_env_secret_names_only_the_variable(monkeypatch):
    monkeypatch.delenv("ALPACA_TEST_MISSING", raising=False)
    server = MCPServer("files", command=[sys.executable, str(SERVER)],
                       env={"TOKEN": "${ALPACA_TEST_MISSING}"})
    with pytest.raises(MCPConnectionError, match="ALPACA_TEST_MISSING is not set"):
        await server.connect()
    await server.close()


async def test_a_server_that_never_answers_times_out():
    server = MCPServer("mute", command=[sys.executable, "-c", "import time; time.sleep(60)"],
                       connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(MCPConnectionError, match=r"handshake within 0\.5s"):
        await server.list_tools()
    assert time.monotonic() - started < 30  # gave up long before the mute server exits (60 s)
    await server.close()


# -- load errors -------------------------------------------------------------------------------


def test_a_server_that_fails_to_start_is_a_workflow_error(tmp_path, call_log):
    command = json.dumps([sys.executable, str(SERVER), "--exit-at-once"])
    path = write_workflow(tmp_path, call_log, ["done"], mcp=f"""
      server: files
      command: {command}""")
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    assert (info.value.line, info.value.field) == (5, "tools[0].mcp.command")
    assert "cannot connect to MCP server 'files'" in info.value.message
    assert "refusing to start" in info.value.message  # the server's own words, from stderr


@pytest.mark.parametrize(("mcp", "entry", "line", "field", "message"), [
    ("\n      server: files", "", 3, "tools[0].mcp", "either command"),
    ('\n      server: files\n      command: ["x"]\n      url: "http://127.0.0.1:1/mcp"', "",
     3, "tools[0].mcp", "either command"),
    ('\n      server: "bad name"\n      command: ["x"]', "", 4, "tools[0].mcp.server",
     "letters, digits"),
    ('\n      server: files\n      command: ["x"]\n      headers: {A: b}', "", 3,
     "tools[0].mcp", "headers apply to HTTP servers"),
    ('\n      server: files\n      url: "http://127.0.0.1:1/mcp"\n      headers:'
     ' {Authorization: "Bearer abcdefgh"}', "", 6, "tools[0].mcp.headers.Authorization",
     "looks like a secret"),
    ('\n      server: files\n      command: ["/nonexistent/alpaca-mcp"]', "", 5,
     "tools[0].mcp.command", "FileNotFoundError"),
    ('\n      server: files\n      url: "http://127.0.0.1:1/mcp"\n      connect_timeout: 3', "",
     5, "tools[0].mcp.url", "cannot connect to MCP server 'files'"),
])
def test_mcp_entry_errors_name_the_line_and_field(tmp_path, call_log, mcp, entry, line, field,
                                                   message):
    path = write_workflow(tmp_path, call_log, ["done"], mcp=mcp, entry=entry)
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    assert (info.value.line, info.value.field) == (line, field), str(info.value)
    assert message in info.value.message
    assert "abcdefgh" not in str(info.value)


def test_an_include_pattern_that_matches_nothing_is_a_workflow_error(tmp_path, call_log):
    path = write_workflow(tmp_path, call_log, ["done"], entry='\n    include: ["add", "raed_*"]')
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    assert (info.value.line, info.value.field) == (8, "tools[0].include[1]")
    assert "'raed_*' matches no tool of MCP server 'files'" in info.value.message
    assert "add, crash, echo, fail" in info.value.message


# -- streamable HTTP ---------------------------------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    """The same server over streamable HTTP under uvicorn; yields its URL and the
    Authorization headers it received."""
    from tests.integration import mcp_server

    app = mcp_server.server.streamable_http_app()
    seen: list[str] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        await app(scope, receive, send)

    config = uvicorn.Config(recording, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + PATIENCE
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/mcp", seen
    server.should_exit = True
    thread.join(10)


async def test_streamable_http_server_with_a_secret_header(http_server, tmp_path, call_log, store,
                                                          servers, monkeypatch):
    # http_server comes first so that it stops last, after the clients have disconnected.
    url, seen = http_server
    secret = "mcp-secret-8d1f0c2b"
    monkeypatch.setenv("ALPACA_TEST_MCP_TOKEN", secret)
    wf = load_workflow(write_workflow(tmp_path, call_log, [
        {"tool": "remote_add", "args": {"a": 20, "b": 22}},
        {"tool": "remote_add", "args": {"a": "x", "b": 1}},
        {"tool": "remote_fail", "args": {}},
        "done"], tools='["remote_*"]', mcp=f"""
      server: remote
      url: {json.dumps(url)}
      headers: {{Authorization: "Bearer ${{ALPACA_TEST_MCP_TOKEN}}"}}"""))
    servers.append(wf)
    tool = wf.tools.get("remote_add")
    assert isinstance(tool, McpTool) and tool.describe()["mcp"]["transport"] == "http"
    record = await run(store, wf)
    ok, invalid, failed = tool_results(wf)
    assert ok == {"result": 42}
    assert invalid["error"]["code"] == "invalid_arguments"
    assert failed["error"]["code"] == "tool_error"
    assert seen and set(seen) == {f"Bearer {secret}"}
    steps = json.dumps([s.model_dump(mode="json") for s in await store.list_steps(record.id)])
    audit = json.dumps([r.to_dict() for r in await store.list_audit(record.id)])
    assert secret not in steps and secret not in audit

"""The tools of an MCP server as governed tools (DESIGN §1, §9: the ``mcp:`` entries).

Each tool of the server becomes an engine Tool named ``{prefix}{tool}`` (prefix
``"{server}_"`` by default, names cleaned to what OpenAI-style providers accept), with the
server's ``inputSchema`` as its input contract and ``outputSchema``, when declared, as its output
contract. The engine validates arguments before the server ever sees them, so the governance of
§2 (allowlist, capabilities, contracts, budget, approval, breaker, retry) applies unchanged.

Connection model. anyio, on which the SDK is built, requires a cancel scope to be exited by the
task that entered it, so a session cannot be opened in one step and closed in another. Each
``(server, event loop)`` pair therefore gets one *owner task* that enters the transport and the
``ClientSession`` in an ``AsyncExitStack``, waits for a stop signal, and exits the stack itself.
Calls are made directly from the caller's task on that session: JSON-RPC multiplexes
concurrent requests, and a caller's timeout cancels only its own request. (A queue served by
the owner task would add a hop without adding safety.) A connection that breaks is dropped and
the error is raised as a ``ConnectionError``, which the retry policy treats as transient; the
next attempt reconnects. The first call on a loop connects lazily; stdio servers are started
once per loop, not once per call.

The tool list must be known when a workflow loads, and loading is synchronous:
``load_mcp_tools_sync`` connects once in a fresh thread with its own loop, lists, and
disconnects.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import anyio
import httpx2
import mcp_types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from ..telemetry.logging import redact_text, register_secret
from .base import Tool, ToolContext
from .contracts import SchemaError
from .http import HeaderTemplate, HttpConfigError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "IDEMPOTENCY_META_KEY",
    "MCPConfigError",
    "MCPConnectionError",
    "MCPServer",
    "MCPToolError",
    "McpTool",
    "load_mcp_tools_sync",
]

log = logging.getLogger("alpaca.tools.mcp")

DEFAULT_CONNECT_TIMEOUT = 30.0
IDEMPOTENCY_META_KEY = "alpaca.engine/idempotency-key"
"""Sent in each call's ``_meta``: a server that honours it executes a step once."""

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NOT_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SECRET_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MAX_ERROR_CHARS = 2000
_MAX_PAGES = 100
_STOP_TIMEOUT = 10.0

Transport = Literal["stdio", "http"]


class MCPConfigError(ValueError):
    """A server definition that cannot work; ``loc`` is relative to the ``mcp:`` mapping."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(f"{'.'.join(loc)}: {message}" if loc else message)
        self.loc = loc
        self.message = message


class MCPConnectionError(ConnectionError):
    """The server could not be started or reached, or the connection broke (transient)."""


class MCPToolError(Exception):
    """The server answered with an error (``isError`` or a JSON-RPC error); not retried."""


@dataclass
class McpTool(Tool):
    """A Tool backed by one tool of an MCP server; ``describe()`` says which."""

    server_name: str = ""
    remote_name: str = ""
    transport: str = "stdio"
    server: MCPServer | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["mcp"] = {"server": self.server_name, "tool": self.remote_name,
                      "transport": self.transport}
        return out


class MCPServer:
    """How to reach one MCP server, and its live connections (one per event loop).

    ``command`` (stdio: the server runs as a subprocess of this one) or ``url`` (streamable
    HTTP). ``env`` values and ``headers`` values may reference environment variables as
    ``${NAME}``; they are resolved when connecting and registered as secrets. A stdio server
    inherits only the SDK's safe environment (PATH, HOME...) plus ``env``: the engine's own keys
    are not handed to third-party code.
    """

    def __init__(
        self,
        name: str,
        *,
        command: str | Sequence[str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        prefix: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise MCPConfigError(("server",), "a server name is 1-64 letters, digits, '_' or '-'")
        if (command is None) == (url is None):
            raise MCPConfigError((), "give either command (stdio) or url (streamable HTTP)")
        self.name = name
        self.command: list[str] = []
        if command is not None:
            self.command = [command] if isinstance(command, str) else list(command)
            self.command += list(args)
            if not self.command or not self.command[0]:
                raise MCPConfigError(("command",), "the command is empty")
        elif args or env or cwd is not None:
            raise MCPConfigError((), "args, env and cwd apply to stdio servers (command) only")
        if url is not None and not url.startswith(("http://", "https://")):
            raise MCPConfigError(("url",), "expected an http:// or https:// URL")
        if headers and url is None:
            raise MCPConfigError(("headers",), "headers apply to HTTP servers (url) only")
        self.url = url
        self.env = dict(env or {})
        for key, value in self.env.items():
            if "${" in _SECRET_REF.sub("", value):
                raise MCPConfigError(("env", key), "malformed ${...} reference; write "
                                                   "${ENV_VAR_NAME}")
        self.cwd = cwd
        try:
            self.headers = tuple(HeaderTemplate.parse(k, v) for k, v in (headers or {}).items())
        except HttpConfigError as exc:
            raise MCPConfigError(exc.loc[1:], exc.message) from None
        self.prefix = f"{name}_" if prefix is None else prefix
        if _NOT_NAME_CHARS.search(self.prefix) or len(self.prefix) > 48:
            raise MCPConfigError(("prefix",), "a prefix is at most 48 letters, digits, '_' "
                                              "or '-'")
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def transport(self) -> Transport:
        return "stdio" if self.command else "http"

    def describe(self) -> dict[str, Any]:
        """What the server is, without secret values."""
        out: dict[str, Any] = {"name": self.name, "transport": self.transport,
                               "prefix": self.prefix}
        if self.command:
            out["command"] = list(self.command)
            out["env"] = sorted(self.env)
        else:
            out["url"] = self.url
            out["headers"] = {h.name: h.describe() for h in self.headers}
        return out

    def tool_name(self, remote: str) -> str:
        """The engine name of a server tool: prefixed, cleaned, at most 64 characters."""
        name = self.prefix + _NOT_NAME_CHARS.sub("_", remote)
        if len(name) > 64:
            digest = hashlib.sha256(remote.encode()).hexdigest()[:8]
            name = f"{name[:55]}_{digest}"
        return name

    # -- connection --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open this loop's connection now instead of on the first call."""
        await self._connection()

    async def close(self) -> None:
        """Close this loop's connection and ask the owners on other loops to stop theirs."""
        current = asyncio.get_running_loop()
        with self._lock:
            states = list(self._loops.items())
            self._loops.clear()
        for loop, state in states:
            conn = state.conn
            if conn is None:
                continue
            if loop is current:
                await conn.close()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(conn.request_stop)

    async def _close_here(self) -> None:
        with self._lock:
            state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None and state.conn is not None:
            await state.conn.close()

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        with self._lock:
            for closed in [other for other in self._loops if other.is_closed()]:
                del self._loops[closed]  # its task references it: the weak key alone won't go
            state = self._loops.get(loop)
            if state is None:
                state = self._loops[loop] = _LoopState()
        async with state.lock:
            if state.conn is None or not state.conn.alive:
                conn = _Connection(self)
                await conn.open()
                state.conn = conn
            return state.conn

    async def _drop(self, conn: _Connection) -> None:
        with self._lock:
            state = self._loops.get(asyncio.get_running_loop())
            if state is not None and state.conn is conn:
                state.conn = None
        await conn.close()

    # -- tools -------------------------------------------------------------------------------

    async def list_tools(self) -> list[Tool]:
        """The server's tools as engine Tools (defaults: no capabilities, no retry)."""
        session = (await self._connection()).session
        if session is None:
            raise MCPConnectionError(f"MCP server {self.name!r}: connection closed")
        listed: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            try:
                page = await session.list_tools(params=params)
            except MCPError as exc:
                raise MCPToolError(f"MCP server {self.name!r}: tools/list failed: "
                                   f"{exc.message}") from None
            listed += page.tools
            cursor = page.next_cursor
            if not cursor:
                break
        tools: list[Tool] = []
        seen: dict[str, str] = {}
        for remote in listed:
            tool = self._to_tool(remote)
            if tool.name in seen:
                raise MCPToolError(f"MCP server {self.name!r}: tools {seen[tool.name]!r} and "
                                   f"{remote.name!r} both map to the name {tool.name!r}")
            seen[tool.name] = remote.name
            tools.append(tool)
        return tools

    def _to_tool(self, remote: mcp_types.Tool) -> McpTool:
        server = self
        name = remote.name

        async def invoke(args: dict[str, Any], ctx: ToolContext) -> Any:
            return await server.call_tool(name, args, idempotency_key=ctx.idempotency_key)

        try:
            return McpTool(
                name=self.tool_name(name),
                description=remote.description or remote.title or name,
                input_schema=dict(remote.input_schema),
                output_schema=dict(remote.output_schema) if remote.output_schema else None,
                invoke=invoke,
                source="mcp",
                server_name=self.name,
                remote_name=name,
                transport=self.transport,
                server=self,
            )
        except SchemaError as exc:
            raise MCPToolError(f"MCP server {self.name!r}: tool {name!r} declares an "
                               f"{exc}") from None

    async def call_tool(self, name: str, arguments: dict[str, Any], *,
                        idempotency_key: str | None = None) -> Any:
        """Call a tool by its server name; the structured result if any, else its text."""
        conn = await self._connection()
        session = conn.session
        if session is None:
            raise MCPConnectionError(f"MCP server {self.name!r}: connection closed")
        meta = cast(mcp_types.RequestParamsMeta, {IDEMPOTENCY_META_KEY: idempotency_key}) \
            if idempotency_key else None
        try:
            result = await session.call_tool(name, arguments, meta=meta)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                await self._drop(conn)
                raise MCPConnectionError(f"MCP server {self.name!r}: {exc.message}") from None
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise TimeoutError(f"MCP server {self.name!r}: {exc.message}") from None
            raise MCPToolError(_clip(f"MCP server {self.name!r}: {exc.message}")) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
            await self._drop(conn)
            raise MCPConnectionError(f"MCP server {self.name!r}: connection closed") from None
        return _result_value(result)

    # -- transports --------------------------------------------------------------------------

    def _resolve(self, template: str, what: str) -> str:
        def fill(match: re.Match[str]) -> str:
            value = os.environ.get(match.group(1))
            if value is None:
                raise MCPConnectionError(f"MCP server {self.name!r}: environment variable "
                                         f"{match.group(1)} is not set (needed by {what})")
            register_secret(value)
            return value

        return _SECRET_REF.sub(fill, template)

    async def _open(self, stack: AsyncExitStack, stderr: _StderrTail | None) -> ClientSession:
        if self.command:
            assert stderr is not None
            params = StdioServerParameters(
                command=self.command[0], args=self.command[1:],
                env={k: self._resolve(v, f"env {k}") for k, v in self.env.items()},
                cwd=self.cwd,
            )
            try:
                read, write = await stack.enter_async_context(
                    stdio_client(params, errlog=stderr.writer))
            finally:
                stderr.release()  # the child holds its own copy now (or never started)
        else:
            assert self.url is not None
            headers = {}
            for header in self.headers:
                headers[header.name] = self._resolve(header.template, f"header {header.name}")
            client = httpx2.AsyncClient(headers=headers,
                                        timeout=httpx2.Timeout(30.0, read=300.0))
            await stack.enter_async_context(client)
            read, write = await stack.enter_async_context(
                streamable_http_client(self.url, http_client=client))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        return session


@dataclass
class _LoopState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conn: _Connection | None = None


class _Connection:
    """One session on one loop, entered and exited by its own owner task."""

    def __init__(self, server: MCPServer) -> None:
        self.server = server
        self.session: ClientSession | None = None
        self.error: BaseException | None = None
        self.stderr: _StderrTail | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.session is not None and self._task is not None and not self._task.done()

    async def open(self) -> None:
        name, timeout = self.server.name, self.server.connect_timeout
        self._task = asyncio.create_task(self._own(), name=f"mcp-owner-{name}")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            await self.close()
            raise MCPConnectionError(f"MCP server {name!r} did not complete the handshake "
                                     f"within {timeout}s{self._stderr_tail()}") from None
        if self.session is None:
            await self.close()
            raise MCPConnectionError(f"cannot connect to MCP server {name!r}: "
                                     f"{_explain(self.error)}{self._stderr_tail()}")

    async def _own(self) -> None:
        if self.server.transport == "stdio":
            self.stderr = _StderrTail(self.server.name)
        try:
            async with AsyncExitStack() as stack:
                self.session = await self.server._open(stack, self.stderr)
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:
            self.error = exc
            if self._ready.is_set():
                log.warning("MCP server %r: connection ended: %s", self.server.name,
                            _explain(exc))
        finally:
            self.session = None
            self._ready.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        task = self._task
        if task is None or task.done():
            return
        if self.session is not None:
            self._stop.set()  # a clean exit: the transport shuts the server down politely
        else:
            task.cancel()  # still connecting: nothing to be polite to
        done, _ = await asyncio.wait({task}, timeout=_STOP_TIMEOUT)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_TIMEOUT)

    def _stderr_tail(self) -> str:
        tail = self.stderr.tail() if self.stderr is not None else ""
        return f"; server stderr: {tail}" if tail else ""


class _StderrTail:
    """The child's stderr through a pipe: logged at DEBUG, the last lines kept for errors.

    A pipe with a reader thread rather than our own stderr: the SDK needs a real file
    descriptor (pytest's capture has none), and a server that fails to start should say why
    in the error, not somewhere in the console.
    """

    def __init__(self, server: str, keep: int = 20) -> None:
        read_fd, write_fd = os.pipe()
        self.server = server
        self.writer = os.fdopen(write_fd, "w", encoding="utf-8")
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), daemon=True,
                                        name=f"mcp-stderr-{server}")
        self._thread.start()

    def _pump(self, fd: int) -> None:
        with open(fd, encoding="utf-8", errors="replace") as stream:
            for raw in stream:
                line = raw.rstrip()
                if line:
                    self._lines.append(line)
                    log.debug("MCP server %s stderr: %s", self.server, line)

    def release(self) -> None:
        if not self.writer.closed:
            self.writer.close()

    def tail(self, lines: int = 5) -> str:
        self._thread.join(0.5)  # let the last words of a dead server arrive
        return redact_text(" | ".join(list(self._lines)[-lines:]))


def _result_value(result: mcp_types.CallToolResult) -> Any:
    """Structured content when the server sent it (it is what ``outputSchema`` describes)."""
    texts = [b.text for b in result.content if isinstance(b, mcp_types.TextContent)]
    if result.is_error:
        raise MCPToolError(_clip("\n".join(texts) or "the tool reported an error"))
    if result.structured_content is not None:
        return result.structured_content
    if len(texts) == len(result.content):
        return "\n".join(texts)
    return {"content": [b.model_dump(mode="json", by_alias=True, exclude_none=True)
                        for b in result.content]}


def _clip(text: str) -> str:
    text = redact_text(text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " [...]"


def _explain(exc: BaseException | None) -> str:
    """The innermost useful message: anyio wraps transport failures in exception groups."""
    if exc is None:
        return "the connection closed during the handshake"
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc) or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}" if str(exc) else text)


def load_mcp_tools_sync(server: MCPServer) -> list[Tool]:
    """List the server's tools from synchronous code (the workflow loader).

    Runs in a fresh thread with its own event loop, so it works whether or not the caller's
    thread has a loop running, and leaves no connection behind: calls connect lazily later on
    the loop that makes them.
    """
    out: list[Tool] = []
    errors: list[BaseException] = []

    async def work() -> list[Tool]:
        try:
            return await asyncio.wait_for(server.list_tools(), server.connect_timeout * 2)
        except TimeoutError:
            raise MCPConnectionError(f"MCP server {server.name!r}: listing tools timed out") \
                from None
        finally:
            await server._close_here()

    def target() -> None:
        try:
            out.extend(asyncio.run(work()))
        except BaseException as exc:  # handed to the calling thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"mcp-load-{server.name}", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out


"""A tiny real MCP server for the integration tests (stdio by default, or streamable HTTP).

Every call is appended to the file named by ``MCP_TEST_CALL_LOG`` (when set), so a test can
prove that the engine refused a call without the server ever seeing it.
"""

from __future__ import annotations

import json
import os
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("alpaca-test")


def _record(tool: str, **args: object) -> None:
    path = os.environ.get("MCP_TEST_CALL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps({"tool": tool, "args": args}) + "\n")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    _record("add", a=a, b=b)
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    _record("echo", text=text)
    return text


@server.tool()
def fail() -> str:
    """Always fails."""
    _record("fail")
    raise RuntimeError("the fail tool failed on purpose")


@server.tool()
def crash() -> str:
    """Kill the server process mid-call (tests reconnection)."""
    _record("crash")
    os._exit(1)


if __name__ == "__main__":
    if "--exit-at-once" in sys.argv:
        print("refusing to start: --exit-at-once", file=sys.stderr)
        sys.exit(3)
    server.run()

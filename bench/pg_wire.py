"""Count what a PostgreSQL client really sends: statements and network round trips.

Used by ``step_overhead.py`` for one extra, untimed run (a proxy slows every round trip down):

* **statements**: every statement psycopg sends (cursor executes, and the ``BEGIN`` /
  ``COMMIT`` / ``ROLLBACK`` / ``SET`` commands the connection sends itself), counted by
  wrapping psycopg's two send paths;
* **round trips**: a TCP proxy between the store and the server counts, per connection, each
  time the client sends after the server last spoke (a request burst after a reply). Statements
  pipelined before the client waits count once; connection setup counts too. This does not
  depend on how the client library is written, only on what crosses the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit


@dataclass
class WireCount:
    statements: int = 0
    round_trips: int = 0


@contextlib.contextmanager
def counting_statements(count: WireCount) -> Iterator[None]:
    """Count every statement psycopg sends while the block runs (all connections)."""
    from psycopg import _connection_base, _cursor_base

    # A statement is sent plainly, or (psycopg prepares one it saw 5 times on a connection)
    # as the execution of a prepared statement; the prepare itself is not counted.
    hooks = [(_cursor_base.BaseCursor, "_execute_send"),
             (_cursor_base.BaseCursor, "_send_query_prepared"),
             (_connection_base.BaseConnection, "_exec_command")]
    originals = [(cls, name, getattr(cls, name)) for cls, name in hooks]

    def counted(original: Any) -> Any:
        def send(self: Any, *args: Any, **kwargs: Any) -> Any:
            count.statements += 1
            return original(self, *args, **kwargs)
        return send

    for cls, name, original in originals:
        setattr(cls, name, counted(original))
    try:
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


class RoundTripProxy:
    """A TCP proxy to the server of ``url``; :attr:`url` points a client at it."""

    def __init__(self, url: str, count: WireCount) -> None:
        self.target = urlsplit(url)
        self.count = count
        self.counting = False
        self._server: asyncio.AbstractServer | None = None
        self._serving: set[asyncio.Task[Any]] = set()
        self.url = url

    async def __aenter__(self) -> RoundTripProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = self.target.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        self.url = urlunsplit(self.target._replace(
            netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Python 3.11's wait_closed does not wait for the connections' handlers: let them
        # end (the store closed its connections) so none is cancelled at the loop's close.
        if self._serving:
            _, stuck = await asyncio.wait(self._serving, timeout=5)
            for task in stuck:
                task.cancel()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)
        await self._relay(client_r, client_w)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(
            self.target.hostname or "127.0.0.1", self.target.port or 5432)
        replied = [True]  # a new connection's first burst counts as a round trip

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, *,
                       from_client: bool) -> None:
            try:
                while data := await src.read(65536):
                    if from_client:
                        if replied[0] and self.counting:
                            self.count.round_trips += 1
                        replied[0] = False
                    else:
                        replied[0] = True
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(client_r, server_w, from_client=True),
                             pump(server_r, client_w, from_client=False))

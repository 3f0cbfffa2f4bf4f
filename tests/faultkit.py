"""Real faults for the storage tests: a small tmpfs to fill, read-only mounts, a server that
accepts connections and never answers, a TCP proxy that can take a real service away, and a
MongoDB wire-protocol stub that answers ``hello`` as a standalone server.

Mounting needs root: these helpers skip locally without it and fail under CI=true (like
:func:`tests.conftest.service_unavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

import bson

from tests.conftest import service_unavailable


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {done.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of ``size`` at ``path`` (created), unmounted afterwards."""
    if os.geteuid() != 0:
        service_unavailable("root (to mount a tmpfs)", "the tests do not run as root")
    path.mkdir(parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    except OSError as exc:
        service_unavailable("mount -t tmpfs", str(exc))
    try:
        yield path
    finally:
        _umount(path)


def remount(path: Path, *, read_only: bool) -> None:
    """Make a mounted tmpfs read-only (or writable again)."""
    _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(path))


@contextlib.contextmanager
def read_only_file(path: Path) -> Iterator[Path]:
    """``path`` itself read-only (a read-only bind mount over it); its directory stays
    writable, so only the file's own writes fail."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        _umount(path)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write ``directory/name`` until the filesystem has no byte left."""
    target = directory / name
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return target


class _Listener:
    """A TCP server on a free loopback port, one thread per connection (``_talk``)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self._held.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(2)
        for conn in self._held:
            conn.close()
        self._sock.close()


class SilentServer(_Listener):
    """Accepts connections and never says anything: a hung server (or a firewall that
    swallows packets after the handshake)."""

    def _talk(self, conn: socket.socket) -> None:
        return None  # held open until the test ends


class TcpProxy:
    """Forwards a local port to a real service; ``stop()`` takes the service away (every
    connection cut, new ones refused) and ``start()`` brings it back on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.round_trips = 0
        """Client bursts sent after the service replied (or first on a connection): what the
        client waited for, however many statements it pipelined into one burst."""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        return parts._replace(netloc=f"{user}127.0.0.1:{self.port}").geturl()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        replied = True

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       upstream: bool) -> None:
            nonlocal replied
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    if upstream and replied:
                        self.round_trips += 1
                    replied = not upstream
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        self._writers -= {writer, up_writer}


class StandaloneMongo(_Listener):
    """Just enough of the MongoDB wire protocol (OP_QUERY and OP_MSG) to answer every
    command like a standalone ``mongod`` answers ``hello``: no ``setName``, so no
    transactions."""

    HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True,
             "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
             "maxWriteBatchSize": 100_000, "logicalSessionTimeoutMinutes": 30,
             "connectionId": 1, "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False,
             "ok": 1.0}

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = conn.recv(n - len(data))
            if not part:
                raise ConnectionError
            data += part
        return data

    def _talk(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ConnectionError), conn:
            while not self._stop:
                length, request_id, _to, opcode = struct.unpack("<iiii", self._read(conn, 16))
                self._read(conn, length - 16)
                doc = bson.encode({**self.HELLO, "localTime": datetime.now(UTC)})
                if opcode == 2004:  # OP_QUERY -> OP_REPLY
                    body = struct.pack("<iqii", 0, 0, 0, 1) + doc
                    conn.sendall(struct.pack("<iiii", 16 + len(body), 1, request_id, 1) + body)
                elif opcode == 2013:  # OP_MSG -> OP_MSG
                    body = struct.pack("<I", 0) + b"\0" + doc
                    conn.sendall(struct.pack("<iiii", 16 + len(body), 1, request_id, 2013)
                                 + body)
                else:
                    return

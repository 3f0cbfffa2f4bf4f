"""Small builders shared by tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import Model
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.base import Store
from alpaca_engine.tools.base import Tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

PATIENCE = 300.0
"""Seconds to wait for something that must eventually happen (a process ready, an event
delivered). Tests assert that it happens, never how fast: this is generous for a 2-core
machine shared with other work, and only bounds how long a broken build takes to fail."""


def workflow(model: Model | Sequence[Any], tools: Sequence[Tool], *, allow: Sequence[str] = ("*",),
             capabilities: frozenset[str] | None = None, max_steps: int = 25,
             budget: dict[str, Any] | None = None) -> Workflow:
    if not isinstance(model, Model):
        model = ScriptedModel(list(model))
    agent = Agent(name="agent", model=model, instructions="Be useful.", tools=list(allow),
                  capabilities=capabilities, max_steps=max_steps)
    return Workflow(ref="test", agents={"agent": agent}, tools=ToolRegistry(tools),
                    budget=budget or {})


def engine(store: Store, wf: Workflow, **kw: Any) -> Engine:
    return Engine(store, lambda ref: wf, **kw)


def gated_workflow(answer: str, expression: str = "6 * 7") -> str:
    """A registered workflow ``pinned`` whose agent waits for approval on a catalog tool
    (``calculate`` of builtin:quickstart), then answers ``answer``: what a version pins."""
    return textwrap.dedent(f"""
        version: 1
        name: pinned
        tools:
          - python: "alpaca_engine.examples_builtin.quickstart_tools:calculate"
            approval: required
        agents:
          - name: agent
            instructions: "{answer}"
            model:
              provider: scripted
              script:
                - {{tool: calculate, args: {{expression: "{expression}"}}}}
                - "{answer}"
            tools: [calculate]
    """).lstrip("\n")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def alpaca_serve(env: dict[str, str], *args: str, port: int | None = None) -> Iterator[str]:
    """A real `alpaca serve` process on ``port`` (default: a free one); yields its base URL
    once /readyz answers, and stops it with SIGTERM (then SIGKILL) afterwards."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpaca_engine", "serve", "--port", str(port), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        yield base
    finally:
        stop(proc, 15)


def wait_ready(proc: subprocess.Popen[str], base: str) -> None:
    """Until the `alpaca serve` process ``proc`` answers /readyz at ``base``."""
    import httpx

    deadline = time.monotonic() + PATIENCE
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "alpaca serve did not become ready"
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``grace`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


PG_URL = os.environ.get("ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ALPACA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a fresh, empty database on the test PostgreSQL server (dropped afterwards):
    what a real `alpaca` process needs, where in-process tests use a schema."""
    import psycopg
    from psycopg import sql

    from tests.conftest import service_unavailable

    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).strip())
        raise
    name = f"alpaca_t_{uuid.uuid4().hex[:10]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(PG_URL)._replace(path="/" + name))
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        admin.close()


@contextmanager
def redis_database() -> Iterator[str]:
    """The URL of a numbered database of the test Redis that no run stream uses yet (its
    `alpaca:*` keys are deleted afterwards); pub/sub is server-wide, which only wakes pollers."""
    import redis

    from tests.conftest import service_unavailable

    base = urlsplit(REDIS_URL)
    try:
        probe = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        probe.ping()
    except redis.RedisError as exc:
        service_unavailable("Redis", str(exc))
        raise
    claim = f"alpaca-test-claim:{uuid.uuid4().hex}"
    for _ in range(200):  # a claim key taken atomically: parallel test workers never share one
        url = urlunsplit(base._replace(path=f"/{random.randint(1, 15)}"))
        client = redis.Redis.from_url(url)
        if client.set("alpaca-test-claim", claim, nx=True, ex=3600):
            if not client.exists("alpaca:runs"):
                break
            client.delete("alpaca-test-claim")
        client.close()
        time.sleep(0.05)
    else:
        raise RuntimeError("no free Redis database (1-15) for the test: all are claimed")
    try:
        yield url
    finally:
        for key in client.scan_iter("alpaca:*"):
            client.delete(key)
        if client.get("alpaca-test-claim") == claim.encode():
            client.delete("alpaca-test-claim")
        client.close()
        probe.close()


"""Small builders shared by tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import Model
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.base import Store
from alpaca_engine.tools.base import Tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow


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
def alpaca_serve(env: dict[str, str], *args: str) -> Iterator[str]:
    """A real `alpaca serve` process on a free port; yields its base URL once /readyz answers,
    and stops it with SIGTERM (then SIGKILL) afterwards."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpaca_engine", "serve", "--port", str(port), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "alpaca serve did not become ready"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

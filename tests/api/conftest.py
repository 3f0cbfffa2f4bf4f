"""Fixtures for the HTTP API: a real app on a temp SQLite file, driven in-process."""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from alpaca_engine.api import create_app
from alpaca_engine.api.auth import create_api_key
from alpaca_engine.config import Settings
from alpaca_engine.store.sqlite import SQLiteStore

TOOLS_PY = '''
"""A gated side effect for the API tests."""

from alpaca_engine.tools.decorator import tool


@tool(capabilities=["announce"])
def announce(message: str) -> str:
    """Announce something to everyone."""
    return f"announced: {message}"
'''

WORKFLOW_YAML = """
version: 1
tools:
  - python: "api_gated_tools:announce"
    approval: required
agents:
  - name: announcer
    description: Announces after a supervisor agrees.
    model:
      provider: scripted
      script:
        - {tool: announce, args: {message: "launch at noon"}}
        - "announced"
    tools: [announce]
    capabilities: [announce]
  - name: echo
    model:
      provider: scripted
      script: ["hello from echo"]
"""


def workflow_folder(folder: Path, workflow_yaml: str) -> Path:
    """``folder/workflow.yaml`` with the gated ``announce`` tool beside it; its path."""
    folder.mkdir()
    (folder / "api_gated_tools.py").write_text(textwrap.dedent(TOOLS_PY))
    path = folder / "workflow.yaml"
    path.write_text(workflow_yaml)
    return path


@pytest.fixture
def gated_workflow(tmp_path: Path) -> Path:
    """A workflow whose ``announcer`` waits for an approval; ``echo`` answers at once."""
    return workflow_folder(tmp_path / "wf", WORKFLOW_YAML)


@dataclass
class Api:
    app: FastAPI
    store: SQLiteStore
    db_url: str
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        """A client as the holder of ``keys[key]`` (no Authorization header when None)."""
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(self.app),
                                 base_url="http://api.test", headers=headers)


ApiFactory = Callable[..., AbstractAsyncContextManager[Api]]


@pytest.fixture
def start_api(tmp_path: Path, gated_workflow: Path) -> ApiFactory:
    """``async with start_api(keys={"alice": ("acme", "user")}) as api`` runs the lifespan."""

    @asynccontextmanager
    async def start(*, keys: dict[str, tuple[str, str]] | None = None, worker: bool = True,
                    workflows: list[str] | None = None, **kw: Any) -> AsyncIterator[Api]:
        url = f"sqlite:///{tmp_path}/api.db"
        store = SQLiteStore(url)
        await store.open()
        made = {}
        for name, (tenant, role) in (keys or {}).items():
            made[name], _ = await create_api_key(store, tenant, role, name=name)
        settings = Settings(database_url=url, poll_interval=0.02, lease_seconds=30)
        app = create_app(settings, store=store, embedded_worker=worker,
                         workflows=workflows or [str(gated_workflow), "builtin:quickstart"],
                         **kw)
        try:
            async with app.router.lifespan_context(app):
                yield Api(app=app, store=store, db_url=url, keys=made)
        finally:
            await store.close()

    return start


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Split an event stream into ``{"id", "event", "data"}`` dicts (comments dropped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = event.get(name, "") + ("\n" if name in event else "") + value
        if "data" in event or "event" in event:
            if "data" in event:
                event["data"] = json.loads(event["data"])
            events.append(event)
    return events

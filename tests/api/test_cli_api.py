"""`alpaca keys create` and `alpaca serve`'s refusal to expose an unauthenticated server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from alpaca_engine.api.auth import hash_key
from alpaca_engine.api.server import is_loopback
from alpaca_engine.cli import app
from alpaca_engine.store.sqlite import SQLiteStore


def stored_keys(url: str) -> list[dict[str, object]]:
    async def go() -> list[dict[str, object]]:
        store = SQLiteStore(url)
        await store.open()
        try:
            return [k.model_dump() for k in await store.list_api_keys()]
        finally:
            await store.close()

    return asyncio.run(go())


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(db: str) -> None:
    result = CliRunner().invoke(app, ["keys", "create", "--tenant", "acme", "--role",
                                      "supervisor", "--name", "sue"])
    assert result.exit_code == 0, result.output
    [key] = result.stdout.split()
    assert key.startswith("alp_") and len(key) > 40
    assert result.output.count(key) == 1 and "shown only this once" in result.output
    [record] = stored_keys(db)
    assert record["key_hash"] == hash_key(key) and record["tenant"] == "acme"
    assert record["role"] == "supervisor" and record["name"] == "sue"
    raw = Path(db.removeprefix("sqlite:///")).read_bytes()
    assert key.encode() not in raw and key[4:].encode() not in raw

    as_json = CliRunner().invoke(app, ["keys", "create", "--tenant", "acme", "--json"])
    data = json.loads(as_json.stdout)
    assert data["role"] == "user" and data["key"].startswith("alp_") and data["key"] != key
    assert len(stored_keys(db)) == 2


def test_keys_create_refuses_an_unknown_role(db: str) -> None:
    result = CliRunner().invoke(app, ["keys", "create", "--tenant", "acme", "--role", "god"])
    assert result.exit_code == 1 and "role must be" in result.output
    assert stored_keys(db) == []


def test_serve_refuses_a_public_address_without_keys(db: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 1
    assert "no API key exists" in result.output and "127.0.0.1" in result.output


def test_serve_reports_a_broken_workflow(db: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nagents: 3\n")
    result = CliRunner().invoke(app, ["serve", "--workflow", str(broken)])
    assert result.exit_code == 1 and "workflow error" in result.output


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))

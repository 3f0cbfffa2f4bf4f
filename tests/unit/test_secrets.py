"""Secrets never reach logs, audit records, the journal or the database file.

A real run: the OpenAI adapter (API key) against a local OpenAI-compatible server, an HTTP
tool whose Authorization header comes from a secret (and whose server echoes it back), and
the Slack notifier (the webhook URL is the credential). Everything is then searched for the
secret values, including the raw bytes of the SQLite file.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from alpaca_engine.engine import Engine
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.telemetry.logging import configure_logging
from alpaca_engine.workflows.loader import load_workflow_text

API_KEY = "sk-test-0penai-K3y-abcdefghijklmnop"
TOKEN = "svc-token-Zq8v1Lx0Pw2Nm4Rt"
WEBHOOK_PATH = "/services/T0001/B0001/webhook-secret-XYZ123"


class Server:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.turn = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                outer.requests.append({"path": self.path,
                                       "headers": {k.lower(): v for k, v in self.headers.items()},
                                       "body": body})
                if self.path.endswith("/chat/completions"):
                    self._json(outer.completion(body))
                elif self.path == "/echo":
                    # a careless upstream echoing the credential back
                    self._json({"seen_authorization": self.headers.get("Authorization"),
                                "city": body.get("city")})
                else:
                    self._json({"ok": True})

            def _json(self, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        self.turn += 1
        calls = {1: ("lookup", {"city": "Lima"}),
                 2: ("notify_slack", {"text": "weather fetched", "channel": "#ops"})}
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if self.turn in calls:
            name, args = calls[self.turn]
            message["tool_calls"] = [{"id": f"c{self.turn}", "type": "function", "function": {
                "name": name, "arguments": json.dumps(args)}}]
        else:
            message["content"] = "all done"
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if self.turn in calls else "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def database_bytes(folder: Path) -> str:
    """The SQLite file and its WAL, as text (latin-1 keeps every byte)."""
    return b"".join(p.read_bytes() for p in folder.glob("secrets.db*")).decode("latin-1")


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


async def test_no_secret_anywhere(server: Server, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("SVC_TOKEN", TOKEN)
    monkeypatch.setenv("ALPACA_SLACK_WEBHOOK_URL", server.url + WEBHOOK_PATH)
    monkeypatch.setenv("ALPACA_IDEMPOTENCY_DB", str(tmp_path / "idem.db"))
    workflow = load_workflow_text(f"""
version: 1
tools:
  - name: lookup
    http:
      method: POST
      url: "{server.url}/echo"
      headers: {{Authorization: "Bearer ${{SVC_TOKEN}}"}}
    input_schema: {{type: object, properties: {{city: {{type: string}}}}, required: [city]}}
  - python: "alpaca_engine.toolkit:notify_slack"
    approval: never
agents:
  - name: ops
    model: {{provider: openai, model: gpt-4o-mini, base_url: "{server.url}/v1",
             api_key_env: OPENAI_API_KEY}}
    tools: [lookup, notify_slack]
""", source="secrets.yaml")
    log_stream = io.StringIO()
    handler = configure_logging(level="DEBUG", json=True, stream=log_stream)
    db = tmp_path / "secrets.db"
    store = SQLiteStore(f"sqlite:///{db}")
    await store.open()
    try:
        run = await Engine(store, lambda r: workflow).run(workflow, "ops", "check the weather")
        logging.getLogger("alpaca.test").info("done with key %s and token %s", API_KEY, TOKEN)
        steps = await store.list_steps(run.id)
        audit = await store.list_audit(run.id)
        record = await store.get_run(run.id)
    finally:
        await store.close()
        logging.getLogger().removeHandler(handler)

    assert run.state == "succeeded", run.error_message
    # the secrets really were used on the wire
    auth = [r["headers"].get("authorization") for r in server.requests]
    assert f"Bearer {API_KEY}" in auth and f"Bearer {TOKEN}" in auth
    assert any(r["path"] == WEBHOOK_PATH for r in server.requests)
    # ... and appear nowhere we keep
    haystacks = {
        "logs": log_stream.getvalue(),
        "journal": json.dumps([s.model_dump(mode="json") for s in steps]),
        "audit": json.dumps([a.to_dict() for a in audit]),
        "run": record.model_dump_json(),
        "database file": database_bytes(tmp_path),
    }
    assert "weather fetched" in haystacks["audit"]  # the haystacks are not empty
    assert "seen_authorization" in haystacks["journal"]
    for where, text in haystacks.items():
        for secret in (API_KEY, TOKEN, WEBHOOK_PATH, server.url + WEBHOOK_PATH):
            assert secret not in text, f"{secret[:12]}… leaked into {where}"

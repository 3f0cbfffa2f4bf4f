"""Secrets never reach logs, audit records, the journal or the database file.

A real run: the OpenAI adapter (API key) against a local OpenAI-compatible server, an HTTP
tool whose Authorization header comes from a secret (and whose server echoes it back), and
the Slack notifier (the webhook URL is the credential). Everything is then searched for the
secret values, including the raw bytes of the SQLite file.
"""

from __future__ import annotations

import asyncio
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


def database_bytes(folder: Path, name: str = "secrets.db") -> str:
    """The SQLite file, its WAL and shared memory, as text (latin-1 keeps every byte)."""
    files = list(folder.glob(name + "*"))
    assert files, f"no {name} in {folder}"
    return b"".join(p.read_bytes() for p in files).decode("latin-1")


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


# --------------------------------------------------------------------------------------------
# A tool whose exception quotes a credential, and a model that echoes a key: the values are
# masked in everything written or shown, whichever door it is read through.

LEAK_TOKEN = "tok-Zq8v1Lx0Pw2Nm4Rt9KdQ"
ECHOED_KEY = "sk-live-ECHO0123456789abcdefXYZ"
# Prefixes too: the CLI shortens long values, so a leak may show only the start of a secret.
LEAKED = (LEAK_TOKEN, ECHOED_KEY, LEAK_TOKEN[:12], ECHOED_KEY[:14])

LEAK_TOOLS = '''
"""A tool that leaks a credential in its exception, and models that echo secrets."""

import json
import os

from alpaca_engine.tools.decorator import tool

ECHOED_KEY = "sk-live-ECHO0123456789abcdefXYZ"


@tool
def login(user: str) -> str:
    """Log in to the upstream service."""
    raise RuntimeError("auth failed with token " + os.environ["TOKEN"])


@tool
def announce(message: str) -> str:
    """Announce something (needs a supervisor)."""
    return "announced " + message


def _record(messages):
    with open(os.environ["LEAK_MODEL_LOG"], "a") as f:
        f.write(json.dumps([m.model_dump() for m in messages]) + "\\n")
    return [m for m in messages if m.role == "tool"]


def leaker(messages, tools):
    if not _record(messages):
        return {"tool": "login", "args": {"user": "Bearer " + ECHOED_KEY}}
    return (f"login failed. Retry with Authorization: Bearer {ECHOED_KEY} "
            f"or the token {os.environ['TOKEN']}")


def gated(messages, tools):
    if not _record(messages):
        return {"tool": "announce", "args": {"message": "use Bearer " + ECHOED_KEY}}
    return "announced"
'''

LEAK_WORKFLOW = """
version: 1
tools:
  - python: "leak_tools:login"
  - python: "leak_tools:announce"
    approval: required
agents:
  - name: leaker
    model: {provider: function, function: "leak_tools:leaker"}
    tools: [login]
  - name: gated
    model: {provider: function, function: "leak_tools:gated"}
    tools: [announce]
"""


def _assert_clean(where: str, text: str) -> None:
    for secret in LEAKED:
        assert secret not in text, f"{secret!r} leaked into {where}"


def test_tool_exception_and_model_echo_leave_no_trace(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from alpaca_engine.cli import app

    folder = tmp_path / "wf"
    folder.mkdir()
    (folder / "leak_tools.py").write_text(LEAK_TOOLS)
    wf = folder / "workflow.yaml"
    wf.write_text(LEAK_WORKFLOW)
    db_url = f"sqlite:///{tmp_path}/leak.db"
    model_log = tmp_path / "model.jsonl"
    monkeypatch.setenv("TOKEN", LEAK_TOKEN)  # a secret-looking name: registered at startup
    monkeypatch.setenv("LEAK_MODEL_LOG", str(model_log))
    monkeypatch.setenv("ALPACA_DATABASE_URL", db_url)
    monkeypatch.setenv("ALPACA_LOG_LEVEL", "DEBUG")  # log lines are searched too
    monkeypatch.setenv("COLUMNS", "400")
    runner = CliRunner()
    shown: dict[str, str] = {}

    def cli(name: str, *args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, result.output
        shown[name] = result.output  # stdout and stderr (the log lines)
        return result.stdout

    # `alpaca run`: live progress and the result, then the same with --json
    out = cli("alpaca run", "run", str(wf), "--agent", "leaker", "--input", "go")
    assert "tool_error" in out and "RuntimeError: auth failed with token ***" in out
    assert "Bearer ***" in out  # the echo is shown, masked
    data = json.loads(cli("alpaca run --json", "run", str(wf), "-a", "leaker", "-i", "go",
                          "--json"))
    leak_id = data["id"]
    assert data["state"] == "succeeded" and "Bearer ***" in data["output"]
    out = cli("alpaca run (approval)", "run", str(wf), "-a", "gated", "-i", "go", code=3)
    assert "waiting for approval" in out and "Bearer ***" in out
    gated_id = json.loads(cli("runs list", "runs", "list", "--json"))[0]["id"]
    shown_json = {}
    for run_id in (leak_id, gated_id):
        cli(f"runs show {run_id}", "runs", "show", run_id)
        shown_json[run_id] = json.loads(cli(f"runs show --json {run_id}", "runs", "show",
                                            run_id, "--json"))
        cli(f"runs show --timeline {run_id}", "runs", "show", run_id, "--timeline")
        cli(f"audit export {run_id}", "audit", "export", run_id)
    cli("approvals list", "approvals", "list", "--all", "--json")

    steps = shown_json[leak_id]["steps"]
    [tool_step] = [s for s in steps if s["kind"] == "tool"]
    assert tool_step["error"] == {"code": "tool_error",
                                  "message": "RuntimeError: auth failed with token ***"}
    assert tool_step["input"]["args"] == {"user": "Bearer ***"}  # the tool got it masked too

    # every API response
    async def api() -> dict[str, str]:
        import httpx

        from alpaca_engine.api import create_app
        from alpaca_engine.api.auth import create_api_key
        from alpaca_engine.config import Settings

        store = SQLiteStore(db_url)
        await store.open()
        key, _ = await create_api_key(store, "local", "admin", name="auditor")
        got: dict[str, str] = {}
        try:
            app_ = create_app(Settings(database_url=db_url), store=store, embedded_worker=False,
                              workflows=[str(wf)])
            async with app_.router.lifespan_context(app_), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app_), base_url="http://api.test",
                    headers={"Authorization": f"Bearer {key}"}) as client:
                paths = ["/v1/runs", "/v1/approvals?status=all"]
                for run_id in (leak_id, gated_id):
                    paths += [f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/steps",
                              f"/v1/runs/{run_id}/audit"]
                paths.append(f"/v1/runs/{leak_id}/events")  # terminal: the stream ends
                for path in paths:
                    response = await client.get(path)
                    assert response.status_code == 200, (path, response.text)
                    got[path] = response.text
        finally:
            await store.close()
        return got

    answers = asyncio.run(api())
    assert "auth failed with token ***" in answers[f"/v1/runs/{leak_id}/steps"]
    assert "Bearer ***" in answers["/v1/approvals?status=all"]
    assert "auth failed with token ***" in answers[f"/v1/runs/{leak_id}/events"]

    # the conversations the model received
    conversations = model_log.read_text()
    assert "RuntimeError: auth failed with token ***" in conversations

    for where, text in {**shown, **answers, "model conversations": conversations,
                        "database file and WAL": database_bytes(tmp_path, "leak.db")}.items():
        _assert_clean(where, text)

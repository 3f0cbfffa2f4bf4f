"""HTTP tools against a real local server, driven through the engine's step gate."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.tools.http import HttpConfigError, HttpTool, make_http_tool
from alpaca_engine.tools.retry import RetryPolicy
from alpaca_engine.workflows.loader import WorkflowError, load_workflow_text
from tests.helpers import engine, workflow

SECRET = "tok-3c9f1e77a2b54d10e8"
TOKEN_ENV = "ALPACA_TEST_WEATHER_TOKEN"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """What the local server received, and the knobs of its flaky endpoint."""

    base: str
    requests: list[Seen] = field(default_factory=list)
    flaky_failures: int = 1

    def paths(self, prefix: str) -> list[str]:
        return [r.path for r in self.requests if r.path.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    upstream: Upstream

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode())

    def _handle(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(size) if size else b""
        seen = Seen(self.command, self.path, dict(self.headers.items()), body)
        self.upstream.requests.append(seen)
        url = urlsplit(self.path)
        route = url.path
        auth = self.headers.get("Authorization", "")
        try:
            if route.startswith("/weather/"):
                self._json(200, {"path": url.path, "query": parse_qs(url.query),
                                 "method": self.command})
            elif route.startswith("/items/"):
                self._json(201, {"received": json.loads(body or b"null"),
                                 "key": self.headers.get("Idempotency-Key")})
            elif route == "/flaky":
                failures = sum(1 for r in self.upstream.requests if r.path == "/flaky")
                if failures <= self.upstream.flaky_failures:
                    self._json(503, {"error": "try later"})
                else:
                    self._json(200, {"ok": True})
            elif route == "/missing":
                self._json(404, {"error": f"nothing here for credentials {auth}"})
            elif route == "/echo-auth":
                self._json(200, {"you_sent": auth, "nested": [{"header": auth}]})
            elif route == "/big":
                self._send(200, b"x" * 5000, "text/plain")
            elif route == "/big-unannounced":
                self.close_connection = True
                self._send(200, b"y" * 5000, "text/plain", length=False)
            elif route == "/text":
                self._send(200, ("word " * 100).encode(), "text/plain; charset=utf-8")
            elif route == "/not-json":
                self._send(200, b"{oops", "application/json")
            elif route == "/slow":
                time.sleep(20)  # a daemon thread: the server does not wait for it
                self._json(200, {"late": True})
            else:
                self._json(404, {"error": "no route"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    handler = type("Handler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state = Upstream(base=f"http://127.0.0.1:{server.server_address[1]}")
    handler.upstream = state
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def tool_results(model: ScriptedModel) -> list[Any]:
    last = model.calls[-1]
    return [json.loads(m.content or "null") for m in last if m.role == "tool"]


async def run_calls(store: Any, tools: list[HttpTool], calls: list[dict[str, Any]]) -> Any:
    model = ScriptedModel([*calls, "done"])
    wf = workflow(model, tools)
    run = await engine(store, wf).run(wf, "agent", "go")
    assert run.state == "succeeded", (run.error_code, run.error_message)
    return run, tool_results(model)


# -- request shape -----------------------------------------------------------------------------


async def test_url_placeholders_are_encoded_and_other_args_go_to_the_query(store, upstream):
    weather = make_http_tool(
        "weather", method="GET", url=upstream.base + "/weather/{city}",
        input_schema={"type": "object", "properties": {
            "city": {"type": "string"}, "units": {"type": "string"},
            "days": {"type": "array", "items": {"type": "integer"}}},
            "required": ["city"], "additionalProperties": False},
    )
    _, [result] = await run_calls(store, [weather], [
        {"tool": "weather", "args": {"city": "São Paulo/Centro?x=1", "units": "metric",
                                     "days": [1, 2]}}])
    [seen] = upstream.requests
    assert seen.method == "GET"
    assert seen.path.startswith("/weather/S%C3%A3o%20Paulo%2FCentro%3Fx%3D1?")
    assert result["path"] == "/weather/S%C3%A3o%20Paulo%2FCentro%3Fx%3D1"
    assert result["query"] == {"units": ["metric"], "days": ["1", "2"]}


async def test_post_sends_the_other_args_as_json_with_the_idempotency_key(store, upstream):
    create = make_http_tool(
        "create_item", method="post", url=upstream.base + "/items/{kind}",
        input_schema={"type": "object", "properties": {
            "kind": {"type": "string"}, "name": {"type": "string"},
            "tags": {"type": "array"}}, "required": ["kind", "name"]},
        output_schema={"type": "object", "required": ["received", "key"]},
    )
    run, [result] = await run_calls(store, [create], [
        {"tool": "create_item", "args": {"kind": "book", "name": "Dune", "tags": ["sf"]}}])
    [seen] = upstream.requests
    assert (seen.method, seen.path) == ("POST", "/items/book")
    assert json.loads(seen.body) == {"name": "Dune", "tags": ["sf"]}
    assert seen.headers["Content-Type"] == "application/json"
    steps = await store.list_steps(run.id)
    assert result == {"received": {"name": "Dune", "tags": ["sf"]},
                      "key": steps[1].idempotency_key}


async def test_non_json_bodies_come_back_as_status_and_truncated_text(store, upstream):
    text = make_http_tool("text", method="GET", url=upstream.base + "/text",
                          max_text_chars=20)
    _, [result] = await run_calls(store, [text], [{"tool": "text", "args": {}}])
    assert result["status"] == 200
    assert result["text"].startswith("word word word word ")
    assert "[truncated: 480 more characters]" in result["text"]


async def test_a_body_that_claims_json_but_is_not_is_a_tool_error(store, upstream):
    tool = make_http_tool("bad", method="GET", url=upstream.base + "/not-json")
    _, [result] = await run_calls(store, [tool], [{"tool": "bad", "args": {}}])
    assert result["error"]["code"] == "tool_error"
    assert "not valid JSON" in result["error"]["message"]


async def test_the_input_contract_is_enforced_before_any_request(store, upstream):
    weather = make_http_tool("weather", method="GET", url=upstream.base + "/weather/{city}")
    assert weather.input_schema["required"] == ["city"]
    _, results = await run_calls(store, [weather], [
        {"tool": "weather", "args": {}},
        {"tool": "weather", "args": {"city": "Lyon", "extra": 1}}])
    assert [r["error"]["code"] for r in results] == ["invalid_arguments"] * 2
    assert upstream.requests == []


# -- failures ----------------------------------------------------------------------------------


async def test_503_then_200_is_retried_by_the_runner(store, upstream):
    flaky = make_http_tool("flaky", method="GET", url=upstream.base + "/flaky",
                           retry=RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=0))
    run, [result] = await run_calls(store, [flaky], [{"tool": "flaky", "args": {}}])
    assert result == {"ok": True}
    assert upstream.paths("/flaky") == ["/flaky", "/flaky"]
    steps = await store.list_steps(run.id)
    assert steps[1].attempts == 2 and steps[1].status == "completed"
    retries = [r for r in await store.list_audit(run.id) if r.kind == "tool.retry"]
    assert len(retries) == 1 and "HTTP 503" in retries[0].data["error"]


async def test_5xx_that_persists_fails_after_the_attempts(store, upstream):
    upstream.flaky_failures = 10
    flaky = make_http_tool("flaky", method="GET", url=upstream.base + "/flaky",
                           retry=RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=0))
    _, [result] = await run_calls(store, [flaky], [{"tool": "flaky", "args": {}}])
    assert result["error"]["code"] == "tool_error"
    assert "HTTP 503" in result["error"]["message"]
    assert len(upstream.paths("/flaky")) == 2


async def test_404_is_permanent_and_never_retried(store, upstream):
    missing = make_http_tool("missing", method="GET", url=upstream.base + "/missing",
                             retry=RetryPolicy(max_attempts=3, initial_delay=0.01))
    _, [result] = await run_calls(store, [missing], [{"tool": "missing", "args": {}}])
    assert result["error"]["code"] == "tool_error"
    assert "HTTP 404" in result["error"]["message"]
    assert "nothing here" in result["error"]["message"]  # a short excerpt of the body
    assert len(upstream.paths("/missing")) == 1


@pytest.mark.parametrize("route", ["/big", "/big-unannounced"])
async def test_oversized_responses_are_refused(store, upstream, route):
    big = make_http_tool("big", method="GET", url=upstream.base + route,
                         max_response_bytes=1000)
    _, [result] = await run_calls(store, [big], [{"tool": "big", "args": {}}])
    assert result["error"]["code"] == "tool_error"
    assert "max_response_bytes=1000" in result["error"]["message"]


async def test_a_slow_endpoint_times_out(store, upstream):
    slow = make_http_tool("slow", method="GET", url=upstream.base + "/slow", timeout=0.3)
    started = time.monotonic()
    _, [result] = await run_calls(store, [slow], [{"tool": "slow", "args": {}}])
    assert result["error"]["code"] == "tool_timeout"
    assert time.monotonic() - started < 15  # it gave up well before the response (20 s)


async def test_an_unreachable_endpoint_is_a_transient_connection_error(store, upstream):
    closed = make_http_tool("closed", method="GET", url="http://127.0.0.1:9/nothing",
                            retry=RetryPolicy(max_attempts=2, initial_delay=0.01, jitter=0))
    run, [result] = await run_calls(store, [closed], [{"tool": "closed", "args": {}}])
    assert result["error"]["code"] == "tool_error"
    assert "HttpConnectionError" in result["error"]["message"]
    steps = await store.list_steps(run.id)
    assert steps[1].attempts == 2


async def test_a_missing_secret_fails_the_call_and_names_only_the_variable(
        store, upstream, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    tool = make_http_tool("auth", method="GET", url=upstream.base + "/echo-auth",
                          headers={"Authorization": f"Bearer ${{{TOKEN_ENV}}}"})
    _, [result] = await run_calls(store, [tool], [{"tool": "auth", "args": {}}])
    assert result["error"]["code"] == "tool_error"
    assert f"environment variable {TOKEN_ENV} is not set" in result["error"]["message"]
    assert upstream.requests == []


# -- secrets -----------------------------------------------------------------------------------


async def test_a_secret_header_reaches_the_server_and_nowhere_else(
        store, upstream, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    headers = {"Authorization": f"Bearer ${{{TOKEN_ENV}}}", "Accept": "application/json"}
    echo = make_http_tool("echo_auth", method="GET", url=upstream.base + "/echo-auth",
                          headers=headers)
    missing = make_http_tool("missing", method="GET", url=upstream.base + "/missing",
                             headers=headers)
    run, results = await run_calls(store, [echo, missing], [
        {"tool": "echo_auth", "args": {}}, {"tool": "missing", "args": {}}])

    assert [r.headers["Authorization"] for r in upstream.requests] == [f"Bearer {SECRET}"] * 2
    described = echo.describe()
    assert described["http"]["headers"] == {"Authorization": f"<secret from {TOKEN_ENV}>",
                                            "Accept": "application/json"}
    assert described["source"] == "http"
    ok, failed = results
    assert ok == {"you_sent": "Bearer ***", "nested": [{"header": "Bearer ***"}]}
    assert failed["error"]["code"] == "tool_error"
    places = {
        "describe": json.dumps([echo.describe(), missing.describe()]),
        "model": json.dumps(results),
        "steps": json.dumps([s.model_dump(mode="json")
                             for s in await store.list_steps(run.id)]),
        "audit": json.dumps([r.to_dict() for r in await store.list_audit(run.id)]),
        "run": json.dumps((await store.get_run(run.id)).model_dump(mode="json")),
        "logs": caplog.text,
        "repr": repr(echo),
    }
    for where, text in places.items():
        assert SECRET not in text, f"the secret leaked into {where}"


# -- definitions and the workflow file ---------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "loc", "message"), [
    ({"method": "FETCH", "url": "https://x.test/"}, ("http", "method"), "expected one of"),
    ({"method": "GET", "url": "ftp://x.test/"}, ("http", "url"), "http:// or https://"),
    ({"method": "GET", "url": "https://{host}/x"}, ("http", "url"), "host must be fixed"),
    ({"method": "GET", "url": "https://x.test/?key=${KEY}"}, ("http", "url"), "headers"),
    ({"method": "GET", "url": "https://x.test/{a-b}"}, ("http", "url"), "not a name"),
    ({"method": "GET", "url": "https://x.test/{a"}, ("http", "url"), "unbalanced"),
    ({"method": "GET", "url": "https://x.test/{a}", "input_schema": {"type": "object"}},
     ("input_schema",), "{a} must be a required property"),
    ({"method": "GET", "url": "https://x.test/", "input_schema": {"type": "nope"}},
     ("input_schema",), "invalid JSON Schema"),
    ({"method": "GET", "url": "https://x.test/", "headers": {"X-Api-Key": "abcd1234"}},
     ("http", "headers", "X-Api-Key"), "looks like a secret"),
    ({"method": "GET", "url": "https://x.test/", "headers": {"X-T": "${oops"}},
     ("http", "headers", "X-T"), "malformed"),
])
def test_definitions_that_cannot_work_are_refused(kwargs, loc, message):
    with pytest.raises(HttpConfigError) as info:
        make_http_tool("t", **kwargs)
    assert info.value.loc == loc
    assert message in info.value.message
    assert "abcd1234" not in str(info.value)


AGENT = """
agents:
  - name: forecaster
    model:
      provider: scripted
      script:
        - {tool: weather, args: {city: Paris}}
        - "done"
    tools: [weather]
    capabilities: [net:weather]
"""


def weather_yaml(base: str) -> str:
    return f"""version: 1
tools:
  - name: weather
    http:
      method: GET
      url: "{base}/weather/{{city}}"
      headers: {{Authorization: "Bearer ${{{TOKEN_ENV}}}"}}
      max_response_bytes: 100000
    input_schema: {{type: object, properties: {{city: {{type: string}}}}, required: [city],
                   additionalProperties: false}}
    output_schema: {{type: object}}
    capabilities: [net:weather]
    retry: {{max_attempts: 2}}
    timeout: 5
""" + AGENT


async def test_a_workflow_file_declares_an_http_tool(store, upstream, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, SECRET)
    wf = load_workflow_text(weather_yaml(upstream.base), source="weather.yaml")
    tool = wf.tools.get("weather")
    assert isinstance(tool, HttpTool)
    assert (tool.timeout, tool.capabilities, tool.retry.max_attempts) == (
        5, frozenset({"net:weather"}), 2)
    assert tool.max_response_bytes == 100000
    run = await engine(store, wf).run(wf, "forecaster", "weather in Paris?")
    assert run.state == "succeeded"
    [seen] = upstream.requests
    assert seen.path == "/weather/Paris" and seen.headers["Authorization"] == f"Bearer {SECRET}"
    steps = await store.list_steps(run.id)
    assert steps[1].output["path"] == "/weather/Paris"


@pytest.mark.parametrize(("edit", "line", "field", "message"), [
    (("      url: ", "      uri: "), 6, "tools[0].http.uri", "unknown field 'uri'"),
    (("method: GET", "method: FETCH"), 5, "tools[0].http.method", "expected one of GET"),
    (("type: object, properties", "type: objekt, properties"), 9, "tools[0].input_schema",
     "invalid JSON Schema"),
    (("required: [city]", "required: []"), 9, "tools[0].input_schema",
     "{city} must be a required property"),
    ((f"Bearer ${{{TOKEN_ENV}}}", "Bearer 12345678"), 7, "tools[0].http.headers.Authorization",
     "looks like a secret"),
    (("max_response_bytes: 100000", "max_response_bytes: 0"), 8,
     "tools[0].http.max_response_bytes", "greater than or equal to 1"),
    (("  - name: weather\n", "  - name: weather\n    python: 'x:y'\n"), 3, "tools[0]",
     "exactly one of python, http or mcp"),
])
def test_workflow_errors_name_the_line_and_field(edit, line, field, message):
    text = weather_yaml("http://127.0.0.1:1").replace(*edit)
    with pytest.raises(WorkflowError) as info:
        load_workflow_text(text, source="weather.yaml")
    assert (info.value.line, info.value.field) == (line, field), str(info.value)
    assert message in info.value.message
    assert "12345678" not in str(info.value)


def test_an_http_entry_without_url_names_the_http_block(tmp_path: Path):
    text = weather_yaml("http://x").replace('      url: "http://x/weather/{city}"\n', "")
    with pytest.raises(WorkflowError) as info:
        load_workflow_text(text, source="weather.yaml")
    assert (info.value.line, info.value.field, info.value.message) == (
        4, "tools[0].http.url", "required field is missing")

"""The traces `alpaca demo` exports over OTLP/HTTP, decoded as a collector would see them.

A tiny HTTP receiver stands in for the collector; the protobuf it receives is decoded with
``opentelemetry-proto``. What must hold: one trace; every model/tool/delegation span is a
child of a run span and lies within it; a run span lasts as long as its execution; a step
that pauses (approval pending, child running) ends OK and says why; no span is an error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

PAUSED = "alpaca.run.paused_reason"


class Receiver(ThreadingHTTPServer):
    """Collects every span POSTed to /v1/traces."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest.FromString(body)
            with self.server.lock:
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        self.server.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


def is_run_span(span: Span) -> bool:
    a = attrs(span)
    return a.get("gen_ai.operation.name") == "invoke_agent" and "alpaca.run.id" in a


def test_the_demo_exports_one_truthful_trace(receiver: Receiver, tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "200",
           "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/demo.db"}
    for name in ("ALPACA_REDIS_URL", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "alpaca_engine", "demo"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    spans = list(receiver.spans)  # the exporter flushed at exit
    assert spans, "nothing was exported"
    by_id = {s.span_id: s for s in spans}

    assert len({s.trace_id for s in spans}) == 1  # the whole tree, every execution, one trace
    errors = [(s.name, s.status.message) for s in spans
              if s.status.code == Status.STATUS_CODE_ERROR]
    assert errors == []
    assert [s.name for s in spans if any(e.name == "exception" for e in s.events)] == []

    runs = [s for s in spans if is_run_span(s)]
    steps = [s for s in spans if attrs(s).get("gen_ai.operation.name") in
             ("chat", "execute_tool") or attrs(s).get("alpaca.delegation")]
    assert {attrs(s)["gen_ai.agent.name"] for s in runs} == {
        "orchestrator", "search", "research", "decision", "notification"}
    for step in steps:  # a child of its run span, within its start and end
        parent = by_id[step.parent_span_id]
        assert is_run_span(parent), (step.name, parent.name)
        assert parent.start_time_unix_nano <= step.start_time_unix_nano
        assert step.end_time_unix_nano <= parent.end_time_unix_nano
    for run in runs:  # each execution's span covers all of its steps, so it is not empty
        children = [s for s in steps if s.parent_span_id == run.span_id]
        assert children, run.name
        assert run.end_time_unix_nano - run.start_time_unix_nano >= max(
            c.end_time_unix_nano - c.start_time_unix_nano for c in children)

    # The orchestrator waits for each child and the notification for its approval: each
    # pause ends its step OK and says why, on the step and on that execution's run span;
    # each resume is a new run span (a new epoch) of the same run.
    paused = [s for s in steps if PAUSED in attrs(s)]
    reasons = [attrs(s)[PAUSED] for s in paused]
    assert any("approval" in r for r in reasons) and any("child run" in r for r in reasons)
    assert all(s.status.code == Status.STATUS_CODE_OK for s in paused)
    for step in paused:
        run = by_id[step.parent_span_id]
        assert attrs(run)[PAUSED] == attrs(step)[PAUSED]
        assert attrs(run)["alpaca.run.state"] == "waiting"
    root = [s for s in runs if attrs(s)["gen_ai.agent.name"] == "orchestrator"]
    assert len(root) >= 2 and len({attrs(s)["alpaca.run.epoch"] for s in root}) == len(root)
    assert {attrs(s)["alpaca.run.id"] for s in root} == {attrs(root[0])["alpaca.run.id"]}
    assert sorted(attrs(s)["alpaca.run.state"] for s in root)[-1] == "waiting"
    assert "succeeded" in {attrs(s)["alpaca.run.state"] for s in root}

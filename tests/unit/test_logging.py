"""JSON log lines: context ids on every line, secrets never in the output."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from alpaca_engine.telemetry.logging import (
    JsonFormatter,
    bind,
    clear_secrets,
    configure_logging,
    redact_text,
    register_secret,
)
from alpaca_engine.telemetry.tracing import configure_tracing, run_span

SECRET = "whsec-9f8e7d6c5b4a-webhook"
API_KEY = "sk-proj-AbCdEf0123456789xyz"
log = logging.getLogger("alpaca.test")


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def out() -> Iterator[Captured]:
    root = logging.getLogger()
    level = root.level
    captured = Captured()
    handler = configure_logging("DEBUG", stream=captured.stream)
    register_secret(SECRET)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        clear_secrets()


def test_every_line_is_json_with_context_ids(out: Captured) -> None:
    log.info("outside")
    with bind(run_id="run-42", step=3):
        log.warning("inside %s", "bound")
        with bind(step=4, agent="planner"):
            log.debug("nested")
    lines = out.lines()
    assert [line["msg"] for line in lines] == ["outside", "inside bound", "nested"]
    for line in lines:
        assert {"ts", "level", "logger", "msg", "run_id", "step", "trace_id", "span_id"} <= set(
            line
        )
        assert line["logger"] == "alpaca.test"
        assert line["ts"].endswith("Z")
    assert lines[0]["run_id"] is None and lines[0]["trace_id"] is None
    assert (lines[1]["run_id"], lines[1]["step"], lines[1]["level"]) == ("run-42", 3, "WARNING")
    assert (lines[2]["run_id"], lines[2]["step"], lines[2]["agent"]) == ("run-42", 4, "planner")


def test_trace_and_span_ids_come_from_the_current_span(out: Captured) -> None:
    configure_tracing(exporter=InMemorySpanExporter())
    with run_span("run-7", "a") as span:
        log.info("traced")
    ctx = span.get_span_context()
    [line] = out.lines()
    assert line["trace_id"] == format(ctx.trace_id, "032x")
    assert line["span_id"] == format(ctx.span_id, "016x")


async def test_concurrent_tasks_keep_their_own_run_id(out: Captured) -> None:
    async def one(run_id: str) -> None:
        with bind(run_id=run_id, step=1):
            await asyncio.sleep(0)
            log.info("step")

    await asyncio.gather(one("a"), one("b"))
    mine = [line for line in out.lines() if line["logger"] == "alpaca.test"]
    assert sorted(line["run_id"] for line in mine) == ["a", "b"]


def test_extra_fields_are_included_and_secret_keys_masked(out: Captured) -> None:
    log.info(
        "calling tool",
        extra={
            "tool": "pay",
            "api_key": "plain-looking-value",
            "headers": {"Authorization": "Basic dXNlcjpwYXNz", "Accept": "json"},
            "url": f"https://hooks.example/{SECRET}",
            "run_id": "explicit-run",
        },
    )
    [line] = out.lines()
    assert line["tool"] == "pay"
    assert line["api_key"] == "***"
    assert line["headers"] == {"Authorization": "***", "Accept": "json"}
    assert line["url"] == "https://hooks.example/***"
    assert line["run_id"] == "explicit-run"  # an explicit value beats the context
    assert "plain-looking-value" not in out.text and "dXNlcjpwYXNz" not in out.text


def test_secrets_never_appear_in_msg_args_or_exceptions(out: Captured) -> None:
    class Config:
        def __repr__(self) -> str:
            return f"Config(key={API_KEY!r}, hook={SECRET!r})"

    with bind(run_id="r1", step=1):
        log.info(f"key is {API_KEY}")
        log.info("posting to %s with %r", SECRET, Config())
        log.info("header %(h)s", {"h": "Bearer abc.def-ghi_jkl"})
        try:
            raise RuntimeError(f"401 from provider using {API_KEY} and {SECRET}")
        except RuntimeError:
            log.exception("model call failed")
        log.info("stack", stack_info=True, extra={"note": f"token {API_KEY}"})

    text = out.text
    assert API_KEY not in text and "AbCdEf0123456789xyz" not in text
    assert SECRET not in text
    assert "abc.def-ghi_jkl" not in text
    lines = out.lines()
    assert lines[0]["msg"] == "key is ***"
    assert lines[1]["msg"] == "posting to *** with Config(key='***', hook='***')"
    assert lines[2]["msg"] == "header Bearer ***"
    assert lines[3]["msg"] == "model call failed"
    assert "RuntimeError: 401 from provider using *** and ***" in lines[3]["exc"]
    assert "Traceback" in lines[3]["exc"]
    assert lines[4]["note"] == "token ***"
    assert "stack" in lines[4]
    assert all(line["run_id"] == "r1" for line in lines)


def test_unformattable_args_do_not_leak(out: Captured) -> None:
    log.info("two %s %s", SECRET)  # one arg short: logging would print args raw on stderr
    [line] = out.lines()
    assert SECRET not in out.text
    assert "unformattable args" in line["msg"]


def test_text_mode_is_redacted_too() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("INFO", json=False, stream=stream)
    try:
        with bind(run_id="r9", step=2):
            log.info("key %s", API_KEY)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    text = stream.getvalue()
    assert API_KEY not in text
    assert "[run=r9 step=2 trace=None] key ***" in text


def test_configure_twice_keeps_one_handler() -> None:
    root = logging.getLogger()
    level = root.level
    first = configure_logging(stream=io.StringIO())
    second = configure_logging(stream=io.StringIO())
    try:
        assert first not in root.handlers
        assert second in root.handlers
    finally:
        root.removeHandler(second)
        root.setLevel(level)


def test_formatter_alone_still_redacts() -> None:
    register_secret(SECRET)
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "v=%s", (SECRET,), None)
        line = json.loads(JsonFormatter().format(record))
    finally:
        clear_secrets()
    assert line["msg"] == "v=***"


def test_redact_text_patterns() -> None:
    assert redact_text("task-12345678 and risk-assessment") == "task-12345678 and risk-assessment"
    assert redact_text("use sk-abcdefgh now") == "use *** now"
    assert redact_text("sk-short") == "sk-short"
    assert redact_text("Authorization: bearer eyJhbGciOi.J9") == "Authorization: bearer ***"
    register_secret("abc")  # too short to register: would mask ordinary words
    register_secret("")
    try:
        assert redact_text("abcdef") == "abcdef"
    finally:
        clear_secrets()

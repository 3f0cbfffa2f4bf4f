"""Spans: GenAI attributes, nesting, cross-process delegation via traceparent, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from alpaca_engine.errors import AlpacaError, ErrorCode
from alpaca_engine.telemetry import tracing
from alpaca_engine.telemetry.logging import clear_secrets, register_secret
from alpaca_engine.telemetry.tracing import (
    configure_tracing,
    current_traceparent,
    delegation_span,
    get_tracer,
    mark_error,
    model_span,
    record_model_response,
    run_span,
    step_span,
    tool_span,
)

# One exporter for the process: the global provider can be set only once.
_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    configure_tracing(exporter=_EXPORTER)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_configure_is_idempotent(spans: InMemorySpanExporter) -> None:
    provider = configure_tracing(exporter=_EXPORTER)
    assert configure_tracing(exporter=_EXPORTER) is provider
    assert configure_tracing() is provider  # no endpoint, no exporter: unchanged
    assert trace.get_tracer_provider() is provider
    with tool_span("t", call_id="c1", step=1):
        pass
    assert len(spans.get_finished_spans()) == 1  # not exported twice


def test_run_with_model_and_tool_spans_nests_and_has_genai_attributes(
    spans: InMemorySpanExporter,
) -> None:
    with run_span("run-1", "researcher", tenant="acme") as run:
        with model_span("gpt-4o", provider="openai", step=1) as model:
            record_model_response(model, "gpt-4o-2024-08-06", 120, 30, "tool_calls")
        with tool_span("search", call_id="call_abc", step=2):
            pass

    got = by_name(spans)
    run_s, model_s, tool_s = (
        got["invoke_agent researcher"],
        got["chat gpt-4o"],
        got["execute_tool search"],
    )
    assert run_s.kind is SpanKind.INTERNAL
    assert dict(run_s.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "researcher",
        "gen_ai.conversation.id": "run-1",
        "alpaca.run.id": "run-1",
        "alpaca.tenant": "acme",
    }
    assert run_s.parent is None
    assert model_s.kind is SpanKind.CLIENT
    assert dict(model_s.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "alpaca.step": 1,
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "gen_ai.response.finish_reasons": ("tool_calls",),
    }
    assert tool_s.kind is SpanKind.INTERNAL
    assert dict(tool_s.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "search",
        "gen_ai.tool.call.id": "call_abc",
        "alpaca.step": 2,
    }
    run_ctx = run.get_span_context()
    for child in (model_s, tool_s):
        assert child.parent is not None
        assert child.parent.span_id == run_ctx.span_id
        assert child.context is not None
        assert child.context.trace_id == run_ctx.trace_id


def test_record_model_response_skips_unknowns_and_keeps_lists(
    spans: InMemorySpanExporter,
) -> None:
    with model_span("m", provider="p") as span:
        record_model_response(span, None, None, 5, ["stop", "length"])
    attrs = dict(spans.get_finished_spans()[0].attributes or {})
    assert "alpaca.step" not in attrs and "gen_ai.response.model" not in attrs
    assert "gen_ai.usage.input_tokens" not in attrs
    assert attrs["gen_ai.usage.output_tokens"] == 5
    assert attrs["gen_ai.response.finish_reasons"] == ("stop", "length")


def test_child_run_in_another_process_nests_under_delegation_span(
    spans: InMemorySpanExporter,
) -> None:
    with (
        run_span("parent", "planner", tenant="acme"),
        delegation_span("researcher", step=4) as delegation,
    ):
        stored = current_traceparent()
    assert stored is not None and stored.startswith("00-")

    # "Another process": nothing is current, only the stored string crosses over.
    token = otel_context.attach(otel_context.Context())
    try:
        assert current_traceparent() is None
        with (
            run_span("child", "researcher", tenant="acme", parent_traceparent=stored),
            tool_span("fetch", call_id="c9", step=1),
        ):
            pass
    finally:
        otel_context.detach(token)

    finished = spans.get_finished_spans()
    child_run = next(
        s for s in finished if s.attributes and s.attributes.get("alpaca.run.id") == "child"
    )
    deleg = next(s for s in finished if s.attributes and s.attributes.get("alpaca.delegation"))
    d_ctx = delegation.get_span_context()
    assert deleg.name == "invoke_agent researcher"
    assert dict(deleg.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "researcher",
        "alpaca.delegation": True,
        "alpaca.step": 4,
    }
    assert child_run.parent is not None
    assert child_run.parent.span_id == d_ctx.span_id
    assert child_run.parent.is_remote
    assert child_run.context is not None and child_run.context.trace_id == d_ctx.trace_id
    fetch = by_name(spans)["execute_tool fetch"]
    assert fetch.context is not None and fetch.context.trace_id == d_ctx.trace_id


def test_malformed_traceparent_falls_back_to_current_context(
    spans: InMemorySpanExporter,
) -> None:
    with (
        get_tracer().start_as_current_span("outer") as outer,
        run_span("r", "a", parent_traceparent="not-a-traceparent"),
    ):
        pass
    run_s = by_name(spans)["invoke_agent a"]
    assert run_s.parent is not None
    assert run_s.parent.span_id == outer.get_span_context().span_id
    assert "alpaca.tenant" not in (run_s.attributes or {})


def test_mark_error_sets_status_and_error_type(spans: InMemorySpanExporter) -> None:
    with tool_span("pay", call_id="c1", step=3) as span:
        mark_error(span, "tool_timeout", "took longer than 30s")
    s = spans.get_finished_spans()[0]
    assert s.status.status_code is StatusCode.ERROR
    assert s.status.description == "took longer than 30s"
    assert (s.attributes or {})["error.type"] == "tool_timeout"


def test_escaping_exception_is_recorded_redacted(spans: InMemorySpanExporter) -> None:
    register_secret("hunter2-very-secret")
    try:
        with pytest.raises(RuntimeError), run_span("r", "a"):
            raise RuntimeError("auth failed for hunter2-very-secret with sk-abcdefghijkl1234")
    finally:
        clear_secrets()
    s = spans.get_finished_spans()[0]
    assert s.status.status_code is StatusCode.ERROR
    assert (s.attributes or {})["error.type"] == "RuntimeError"
    [event] = s.events
    assert event.name == "exception"
    text = repr(dict(event.attributes or {})) + repr(s.status.description)
    assert "hunter2-very-secret" not in text and "sk-abcdefghijkl1234" not in text
    assert "***" in str((event.attributes or {})["exception.message"])


def test_engine_error_code_wins_and_mark_error_is_kept(spans: InMemorySpanExporter) -> None:
    with pytest.raises(AlpacaError), model_span("m", provider="p", step=1):
        raise AlpacaError(ErrorCode.MODEL_ERROR, "upstream 500")
    with pytest.raises(ValueError), tool_span("t", call_id=None) as span:
        mark_error(span, "invalid_output", "schema mismatch")
        raise ValueError("boom")
    got = by_name(spans)
    assert (got["chat m"].attributes or {})["error.type"] == "model_error"
    tool_attrs = got["execute_tool t"].attributes or {}
    assert tool_attrs["error.type"] == "invalid_output"
    assert "gen_ai.tool.call.id" not in tool_attrs
    assert got["execute_tool t"].status.description == "schema mismatch"


def test_step_span_groups_work(spans: InMemorySpanExporter) -> None:
    with run_span("r", "a"), step_span(2, kind="tool"), tool_span("t", call_id="c", step=2):
        pass
    got = by_name(spans)
    step = got["step 2 tool"]
    assert dict(step.attributes or {}) == {"alpaca.step": 2, "alpaca.step.kind": "tool"}
    assert got["execute_tool t"].parent is not None
    assert step.context is not None
    assert got["execute_tool t"].parent.span_id == step.context.span_id


async def test_spans_nest_per_asyncio_task(spans: InMemorySpanExporter) -> None:
    async def one_run(run_id: str) -> None:
        with run_span(run_id, "a"):
            await asyncio.sleep(0)
            with tool_span(f"tool-{run_id}", call_id=run_id, step=1):
                await asyncio.sleep(0)

    await asyncio.gather(one_run("x"), one_run("y"))
    got = by_name(spans)
    runs = {
        str((s.attributes or {})["alpaca.run.id"]): s
        for s in spans.get_finished_spans()
        if s.name == "invoke_agent a"
    }
    for run_id in ("x", "y"):
        tool = got[f"execute_tool tool-{run_id}"]
        run_ctx = runs[run_id].context
        assert tool.parent is not None and run_ctx is not None
        assert tool.parent.span_id == run_ctx.span_id


def test_otlp_endpoint_installs_batch_exporter_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    added: list[object] = []
    provider = TracerProvider()
    monkeypatch.setattr(tracing, "_provider", provider)
    monkeypatch.setattr(tracing, "_otlp_installed", False)
    monkeypatch.setattr(provider, "add_span_processor", added.append)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert configure_tracing() is provider
    assert configure_tracing() is provider
    assert [type(p).__name__ for p in added] == ["BatchSpanProcessor"]
    for processor in added:
        processor.shutdown()  # type: ignore[attr-defined]


def test_without_a_provider_steps_skip_spans_but_a_continued_trace_still_propagates(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No SDK provider installed: a step span would record nothing, so none is started;
    a trace continued from a caller's traceparent still reaches a delegated child."""
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    with tracing.tool_span("noop", call_id="c1", step=2) as span:
        assert span is trace.INVALID_SPAN
        assert tracing.current_traceparent() is None
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracing.run_span("run_1", "agent", parent_traceparent=parent), \
            tracing.delegation_span("child", step=3):
        carried = tracing.current_traceparent()
    assert carried is not None and carried.split("-")[1] == parent.split("-")[1]

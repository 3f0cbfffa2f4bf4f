"""OpenTelemetry spans for runs, model calls, tool calls and delegations.

Attribute names follow the OpenTelemetry GenAI semantic conventions (``gen_ai.*``, checked
against opentelemetry-semantic-conventions 0.66b2), so standard GenAI trace
views understand them; engine-specific facts live under ``alpaca.*``.

A child run may execute in another worker process, long after its parent suspended. The parent
stores :func:`current_traceparent` (a W3C ``traceparent`` string) with the child run while its
delegation span is current, and the worker passes it back to :func:`run_span`, which makes the
child's run span a child of that delegation span: one trace for the whole tree.

The context managers are synchronous so they work in both sync and async code (contextvars
follow asyncio tasks); enter and leave each one in the same task. Exceptions leaving a span are
recorded with their message and traceback *redacted* (see :mod:`.logging`): span events are
exported and kept like logs.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import (
    INVALID_SPAN,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from ..errors import AlpacaError, Paused
from .logging import redact_text

__all__ = [
    "TRACER_NAME",
    "configure_tracing",
    "current_traceparent",
    "delegation_span",
    "end_run",
    "get_tracer",
    "mark_error",
    "model_span",
    "record_model_response",
    "record_pause",
    "recording",
    "run_span",
    "step_span",
    "tool_span",
]

TRACER_NAME = "alpaca_engine"
PAUSED_REASON = "alpaca.run.paused_reason"
_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

log = logging.getLogger("alpaca.telemetry")

_lock = threading.Lock()
_provider: TracerProvider | None = None
_otlp_installed = False
_exporters: list[SpanExporter] = []  # identity list: exporters are not necessarily hashable
# Explicit W3C propagator: the stored string is a traceparent whatever OTEL_PROPAGATORS says.
_propagator = TraceContextTextMapPropagator()
# The run span of the execution in progress (the runner's task inherits it): a pause deep in a
# step names its reason there too.
_run: ContextVar[Span | None] = ContextVar("alpaca_run_span", default=None)


# --------------------------------------------------------------------------- setup


def get_tracer() -> trace.Tracer:
    """The engine's tracer; before configuration it follows whatever provider is global."""
    return trace.get_tracer(TRACER_NAME)


def configure_tracing(
    service_name: str = "alpaca-engine", exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Install span export once per process; safe to call again (nothing is added twice).

    * an OTLP endpoint in the environment (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
      ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``): OTLP/HTTP export through a batch processor,
      so a slow collector never blocks a step;
    * ``exporter`` (tests: ``InMemorySpanExporter``): exported synchronously, so spans are
      visible as soon as they end;
    * neither: nothing is installed and spans stay no-op (or go to a provider the host
      application configured).

    Returns the SDK provider in use, or None when tracing stays unconfigured.
    """
    global _otlp_installed
    want_otlp = any(os.environ.get(name) for name in _ENDPOINT_ENVS)
    if not want_otlp and exporter is None:
        return _provider
    with _lock:
        provider = _ensure_provider(service_name)
        if want_otlp and not _otlp_installed:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # The exporter reads the endpoint, headers and timeout from the same variables.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            _otlp_installed = True
        if exporter is not None and not any(exporter is known for known in _exporters):
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            _exporters.append(exporter)
        return provider


def _ensure_provider(service_name: str) -> TracerProvider:
    """Reuse an SDK provider the host already set globally; otherwise set ours once."""
    global _provider
    if _provider is not None:
        return _provider
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        _provider = current
        return current
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over the default name.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    _provider = TracerProvider(resource=Resource.create(attributes))
    trace.set_tracer_provider(_provider)
    return _provider


# --------------------------------------------------------------------------- spans


def recording(context: otel_context.Context | None = None) -> bool:
    """Whether a span started now records or propagates anything: a tracer provider is
    installed, or there is a trace to continue (``context``, or a valid current span)."""
    return context is not None or not isinstance(trace.get_tracer_provider(),
                                                 ProxyTracerProvider) \
        or trace.get_current_span().get_span_context().is_valid


_NOT_RECORDING: AbstractContextManager[Span] = nullcontext(INVALID_SPAN)
"""What a span is when nothing records (see :func:`recording`): the step goes on without
one, at no cost (a generator-based context manager per step is a tenth of a journaled
step's CPU). Stateless, so one serves every step."""


def _span(
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue | None],
    context: otel_context.Context | None = None,
) -> AbstractContextManager[Span]:
    """Start ``name`` as the current span; an escaping exception marks it, redacted."""
    if not recording(context):
        return _NOT_RECORDING
    return _recording_span(name, kind, attributes, context)


@contextmanager
def _recording_span(
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue | None],
    context: otel_context.Context | None,
) -> Iterator[Span]:
    clean = {key: value for key, value in attributes.items() if value is not None}
    with get_tracer().start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=clean,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Paused as exc:
            record_pause(span, exc.reason)
            raise
        except Exception as exc:
            _record_exception(span, exc)
            raise


def record_pause(span: Span, reason: str) -> None:
    """End-of-span facts for a step the run waits in: not an error, and why it waits.

    The reason also goes on the run span around it, which the runner returns from normally."""
    clean = redact_text(reason)
    for target in (span, _run.get()):
        if target is not None and target.is_recording():
            target.set_attribute(PAUSED_REASON, clean)
            target.set_status(Status(StatusCode.OK))


def _record_exception(span: Span, exc: Exception) -> None:
    """Like ``Span.record_exception`` + error status, but with secrets scrubbed."""
    if not span.is_recording():
        return
    span.add_event(
        "exception",
        {
            "exception.type": _error_type(exc),
            "exception.message": redact_text(str(exc)),
            "exception.stacktrace": redact_text("".join(traceback.format_exception(exc))),
            "exception.escaped": True,
        },
    )
    # Keep a status (and error.type) the caller already chose with mark_error.
    if isinstance(span, ReadableSpan) and span.status.status_code is StatusCode.ERROR:
        return
    mark_error(span, _error_type(exc), str(exc))


def _error_type(exc: BaseException) -> str:
    """The engine's stable error code when there is one, else the qualified class name."""
    if isinstance(exc, AlpacaError):
        return str(exc.code)
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


@contextmanager
def run_span(
    run_id: str,
    agent: str,
    *,
    tenant: str | None = None,
    parent_traceparent: str | None = None,
    epoch: int | None = None,
) -> Iterator[Span]:
    """Span for one execution of a run of an agent (``invoke_agent {agent}``): keep it open
    while the run executes (tasks started inside inherit it); each resume opens another one
    in the same trace, told apart by ``alpaca.run.epoch``.

    With ``parent_traceparent`` the span's parent is that remote span (the delegation span of
    the parent run), not whatever is current in this process. An unparsable value falls back to
    the current context rather than failing the run.
    """
    context = None
    if parent_traceparent:
        extracted = _propagator.extract({"traceparent": parent_traceparent})
        if trace.get_current_span(extracted).get_span_context().is_valid:
            context = extracted
        else:
            log.warning("run %s: ignoring malformed parent traceparent", run_id)
    with _span(
        f"invoke_agent {agent}",
        SpanKind.INTERNAL,
        {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent,
            "gen_ai.conversation.id": run_id,
            "alpaca.run.id": run_id,
            "alpaca.run.epoch": epoch,
            "alpaca.tenant": tenant,
        },
        context,
    ) as span:
        token = _run.set(span)
        try:
            yield span
        finally:
            _run.reset(token)


_FAILED_STATES = frozenset({"failed", "timed_out", "budget_exceeded"})


def end_run(span: Span, state: str, error_code: str | None = None,
            error_message: str | None = None) -> None:
    """Record where this execution left the run: an error only when the run failed (a pause
    or a cancellation is an outcome, not a fault of the engine)."""
    span.set_attribute("alpaca.run.state", state)
    if state in _FAILED_STATES:
        mark_error(span, error_code or state, error_message or state)
    elif not (isinstance(span, ReadableSpan) and span.status.status_code is StatusCode.OK):
        span.set_status(Status(StatusCode.OK))


def step_span(step: int, *, kind: str) -> AbstractContextManager[Span]:
    """Optional span around one journal step (``step {n} {kind}``) to group its retries."""
    return _span(
        f"step {step} {kind}",
        SpanKind.INTERNAL,
        {"alpaca.step": step, "alpaca.step.kind": str(kind)},
    )


def model_span(model_name: str, *, provider: str,
               step: int | None = None) -> AbstractContextManager[Span]:
    """Span for one model request (``chat {model}``), a CLIENT call to the provider.

    Both ``gen_ai.provider.name`` (current conventions) and ``gen_ai.system`` (older, still
    read by many backends) are set.
    """
    return _span(
        f"chat {model_name}",
        SpanKind.CLIENT,
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model_name,
            "gen_ai.provider.name": provider,
            "gen_ai.system": provider,
            "alpaca.step": step,
        },
    )


def record_model_response(
    span: Span,
    response_model: str | None,
    input_tokens: int | None,
    output_tokens: int | None,
    finish_reason: str | Sequence[str] | None,
) -> None:
    """Put the response facts on a model span; unknown values (None) are left out."""
    if not span.is_recording():
        return
    attributes: dict[str, AttributeValue] = {}
    if response_model:
        attributes["gen_ai.response.model"] = response_model
    if input_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = input_tokens
    if output_tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = output_tokens
    if finish_reason is not None:
        reasons = [finish_reason] if isinstance(finish_reason, str) else list(finish_reason)
        attributes["gen_ai.response.finish_reasons"] = [str(reason) for reason in reasons]
    span.set_attributes(attributes)


def tool_span(tool_name: str, *, call_id: str | None,
              step: int | None = None) -> AbstractContextManager[Span]:
    """Span for one tool execution (``execute_tool {tool}``)."""
    return _span(
        f"execute_tool {tool_name}",
        SpanKind.INTERNAL,
        {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": tool_name,
            "gen_ai.tool.call.id": call_id,
            "alpaca.step": step,
        },
    )


def delegation_span(child_agent: str, *,
                    step: int | None = None) -> AbstractContextManager[Span]:
    """Span for handing work to a child agent; the child's run span nests under it.

    Call :func:`current_traceparent` inside it and store the value with the child run.
    """
    return _span(
        f"invoke_agent {child_agent}",
        SpanKind.INTERNAL,
        {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": child_agent,
            "alpaca.delegation": True,
            "alpaca.step": step,
        },
    )


def current_traceparent() -> str | None:
    """W3C ``traceparent`` of the current span, or None when there is no valid span."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def mark_error(span: Span, code: str, message: str) -> None:
    """Mark ``span`` failed with the engine's error code as ``error.type`` (message redacted)."""
    span.set_status(Status(StatusCode.ERROR, redact_text(message)))
    span.set_attribute("error.type", str(code))

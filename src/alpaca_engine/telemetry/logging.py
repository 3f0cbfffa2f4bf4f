"""Structured JSON logs that carry run, step and trace ids, and never carry secrets.

One JSON object per line so log pipelines can index by ``run_id`` and jump from a line to its
trace. Ids come from contextvars (:func:`bind`) and the current OpenTelemetry span, so call
sites need not pass them. Redaction runs in a handler filter *before* formatting: the message
is rendered with its args, then every registered secret (:func:`register_secret`) and every
string shaped like an API key (``sk-...``) or bearer token is replaced by ``***`` in the
message, the exception text, the stack and the extra fields (values under secret-looking keys
such as ``api_key`` are masked whole).
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

from .audit import REDACTED, is_secret_key, redact

__all__ = [
    "MIN_SECRET_LENGTH",
    "JsonFormatter",
    "RedactingFilter",
    "bind",
    "clear_secrets",
    "configure_logging",
    "current_fields",
    "redact_text",
    "redact_value",
    "register_environment_secrets",
    "register_secret",
    "registered_secrets",
]

MIN_SECRET_LENGTH = 4
"""Shorter values are not registered: masking every "ab" would wreck the logs for no gain."""

# The look-behind keeps words such as "task-12345678" intact.
_SK_PATTERN = re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{8,}")
# Real tokens are long; the minimum keeps prose such as "bearer of" readable.
_BEARER_PATTERN = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
# A str can hold lone surrogates (from "\\ud800" JSON escapes or surrogateescape'd bytes);
# UTF-8 cannot, so SQLite, PostgreSQL and the audit hash would all refuse the text.
_SURROGATES = re.compile("[\ud800-\udfff]")

MAX_REDACT_DEPTH = 100
TOO_DEEP = "[nested too deep]"

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()

_run_id: ContextVar[str | None] = ContextVar("alpaca_log_run_id", default=None)
_step: ContextVar[int | str | None] = ContextVar("alpaca_log_step", default=None)
_fields: ContextVar[Mapping[str, Any] | None] = ContextVar("alpaca_log_fields", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}
_CONTEXT_ATTRS = ("run_id", "step", "trace_id", "span_id")
_HANDLER_MARK = "_alpaca_handler"


# --------------------------------------------------------------------------- secrets


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears in later log lines (API keys, webhook URLs...)."""
    global _secrets
    if not value or len(value.strip()) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value not in _secrets:
            # Longest first is what audit.redact expects for overlapping secrets anyway.
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


SECRET_ENV = "ALPACA_SECRET_ENV"
"""Comma-separated names of more environment variables whose values are secrets."""
MIN_ENV_SECRET_LENGTH = 8
"""A secret-looking variable set to ``true`` or ``1`` must not mask that word everywhere."""


def register_environment_secrets(environ: Mapping[str, str]) -> None:
    """Register the values of secret-looking variables (``*_TOKEN``, ``*_API_KEY``,
    ``*_SECRET``, ``*_PASSWORD``...) and of those named in ``ALPACA_SECRET_ENV``.

    Tools read credentials from the environment; an exception or a result that quotes one
    must be masked even though no workflow field declared it."""
    named = {n.strip() for n in environ.get(SECRET_ENV, "").split(",") if n.strip()}
    for name, value in environ.items():
        looks_secret = is_secret_key(name) and len(value.strip()) >= MIN_ENV_SECRET_LENGTH
        if name in named or looks_secret:
            register_secret(value)


def registered_secrets() -> tuple[str, ...]:
    """The registered secrets, longest first (for redactors that work on pieces of text)."""
    return _secrets


def clear_secrets() -> None:
    """Forget registered secrets (tests; a process normally keeps them for its lifetime)."""
    global _secrets
    with _secrets_lock:
        _secrets = ()


def redact_text(text: str) -> str:
    """``text`` safe to store and show: registered secrets, ``sk-...`` keys and bearer tokens
    replaced by ``***``; lone surrogates (not encodable as UTF-8) and NUL characters (which
    PostgreSQL cannot store) by U+FFFD.

    This is the one redaction pass of the engine; it sits on the hot path, so each costly scan
    runs only when a cheap substring test says it can match (a clean 250 kB string costs a few
    plain ``in`` searches, not four regular-expression scans).
    """
    return _redact_text(text, _secrets)


def _redact_text(text: str, secrets: tuple[str, ...]) -> str:
    """``redact_text`` with the registered secrets read once by the caller."""
    if secrets and any(secret in text for secret in secrets):
        text = redact(text, secrets)
    if "sk-" in text:
        text = _SK_PATTERN.sub(REDACTED, text)
    if "bearer" in text.lower():
        text = _BEARER_PATTERN.sub(r"\1 " + REDACTED, text)
    if not text.isascii():
        text = _SURROGATES.sub("\ufffd", text)
    if "\x00" in text:  # valid Unicode, but PostgreSQL text and jsonb cannot hold it
        text = text.replace("\x00", "\ufffd")
    return text


_SCALARS = frozenset({type(None), bool, int, float})
"""The exact types ``redact_value`` returns as they are (subclasses too, on the long way)."""

_KEY_MEMO_SIZE = 2048
"""Keys beyond it are redacted without being remembered (a result with many unique keys)."""
_key_memo: tuple[tuple[str, ...], dict[str, tuple[str, bool]]] = ((), {})
"""The registered secrets, and for a ``str`` key: its redacted text and whether it names a
secret under those secrets. Mapping keys are the same few names record after record."""


def _key_memo_for(secrets: tuple[str, ...]) -> dict[str, tuple[str, bool]]:
    global _key_memo
    memo_secrets, memo = _key_memo
    if memo_secrets is not secrets:
        memo = {}
        _key_memo = (secrets, memo)
    return memo


def redact_value(value: Any, _depth: int = 0, *, mask_keys: bool = True) -> Any:
    """A JSON-friendly, secret-free copy of ``value``; other objects become redacted text.

    Values under secret-looking keys (``api_key``, ``Authorization``...) are masked whole,
    unless ``mask_keys`` is false (tool arguments: a ``next_token`` parameter is data).
    Containers nested deeper than ``MAX_REDACT_DEPTH`` are cut: a log line or an audit record
    must never fail on a pathological value (the tool gate refuses those earlier).

    On the hot path (every audit record's data): exact types are tried first, text and
    scalar items are done in place of a call, and a ``str`` key's redaction is remembered.
    """
    kind = type(value)
    if kind is str:
        return _redact_text(value, _secrets)
    if kind in _SCALARS:
        return value
    if kind is not dict and kind is not list and kind is not tuple:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return redact_text(value)
    if _depth >= MAX_REDACT_DEPTH and isinstance(value, Mapping | list | tuple | set | frozenset):
        return TOO_DEEP
    secrets = _secrets
    scalars = _SCALARS
    if kind is dict or (kind is not list and kind is not tuple and isinstance(value, Mapping)):
        memo = _key_memo_for(secrets)
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(key) is str:
                known = memo.get(key)
                if known is None:
                    known = (_redact_text(key, secrets), is_secret_key(key))
                    if len(memo) < _KEY_MEMO_SIZE:
                        memo[key] = known
                name, secret = known
                if mask_keys and secret:
                    out[name] = REDACTED
                    continue
            else:
                name = _redact_text(str(key), secrets)
                if mask_keys and is_secret_key(str(key)):
                    out[name] = REDACTED
                    continue
            item_kind = type(item)
            if item_kind is str:
                out[name] = _redact_text(item, secrets)
            elif item_kind in scalars:
                out[name] = item
            else:
                out[name] = redact_value(item, _depth + 1, mask_keys=mask_keys)
        return out
    if kind is list or kind is tuple or isinstance(value, list | tuple | set | frozenset):
        items: list[Any] = []
        for item in value:
            item_kind = type(item)
            if item_kind is str:
                items.append(_redact_text(item, secrets))
            elif item_kind in scalars:
                items.append(item)
            else:
                items.append(redact_value(item, _depth + 1, mask_keys=mask_keys))
        return items
    return _redact_text(str(value), secrets)


# --------------------------------------------------------------------------- context


@contextmanager
def bind(
    *, run_id: str | None = None, step: int | str | None = None, **fields: Any
) -> Iterator[None]:
    """Attach ``run_id``/``step`` (and any extra fields) to every log line in this context.

    Contextvars follow asyncio tasks, so concurrent runs in one process keep their own ids.
    ``None`` keeps the outer value, so a nested ``bind(step=3)`` keeps the run id.
    """
    run_token = _run_id.set(run_id) if run_id is not None else None
    step_token = _step.set(step) if step is not None else None
    fields_token = _fields.set({**(_fields.get() or {}), **fields}) if fields else None
    try:
        yield
    finally:
        if fields_token is not None:
            _fields.reset(fields_token)
        if step_token is not None:
            _step.reset(step_token)
        if run_token is not None:
            _run_id.reset(run_token)


def current_fields() -> dict[str, Any]:
    """The ids a log line written now would carry (also handy for error reports)."""
    out: dict[str, Any] = {"run_id": _run_id.get(), "step": _step.get()}
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        out["trace_id"] = format(ctx.trace_id, "032x")
        out["span_id"] = format(ctx.span_id, "016x")
    else:
        out["trace_id"] = None
        out["span_id"] = None
    return out


# --------------------------------------------------------------------------- filter/formatter


class RedactingFilter(logging.Filter):
    """Stamp context ids on the record and scrub secrets before any formatter sees it.

    It renders ``msg % args`` itself (then drops ``args``) so a secret inside an argument of
    any type is caught, and pre-renders the exception text so the traceback is scrubbed too.
    Attach it to a handler: logger-level filters do not see records from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        self._stamp(record)
        if getattr(record, "_alpaca_redacted", False):
            return True  # a second handler with this filter: already clean
        record.msg = redact_text(self._message(record))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        for key, value in list(vars(record).items()):
            if key in _STANDARD_ATTRS or key.startswith("_alpaca"):
                continue
            setattr(record, key, REDACTED if is_secret_key(key) else redact_value(value))
        setattr(record, "_alpaca_redacted", True)  # noqa: B010 - not a declared attribute
        return True

    @staticmethod
    def _stamp(record: logging.LogRecord) -> None:
        """Ids from the context; an explicit ``extra={"run_id": ...}`` wins."""
        for key, value in current_fields().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        for key, value in (_fields.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        """Render like ``getMessage`` but never fail: a bad format must not leak raw args.

        (``Handler.handleError`` would print the unredacted args to stderr.)
        """
        try:
            return record.getMessage()
        except Exception:
            return f"{record.msg!s} (unformattable args: {record.args!r})"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, ids, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, "_alpaca_redacted", False):
            RedactingFilter().filter(record)  # used without the filter: still never leak
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT_ATTRS:
            out[key] = getattr(record, key, None)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in out and not key.startswith("_alpaca"):
                out[key] = value
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        line = _json.dumps(out, ensure_ascii=False, default=str)
        return redact_text(line)  # belt and braces: anything that slipped past the filter


class _TextFormatter(logging.Formatter):
    """Human-readable lines for local runs, with the same ids and the same redaction."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s "
            "[run=%(run_id)s step=%(step)s trace=%(trace_id)s] %(message)s"
        )

    def format(self, record: logging.LogRecord) -> str:
        if not getattr(record, "_alpaca_redacted", False):
            RedactingFilter().filter(record)
        return redact_text(super().format(record))


# --------------------------------------------------------------------------- setup


def configure_logging(
    level: int | str = "INFO", json: bool = True, stream: TextIO | None = None
) -> logging.Handler:
    """Install one redacting handler on the root logger; calling again replaces it.

    ``stream`` defaults to the *current* ``sys.stderr`` (resolved at call time so test capture
    and reassigned streams are honoured). Returns the handler so callers can remove it.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if json else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

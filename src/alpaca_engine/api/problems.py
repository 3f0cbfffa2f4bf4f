"""RFC 9457 problem details for every error the API returns, and the middlewares behind them.

Clients get one error shape whatever failed (a route, validation, an unknown path, a body
that is too large, a bug), so they can branch on ``code`` instead of parsing prose.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ApprovalConflict, NotFound
from ..faults import StoreUnavailable, Unavailable, fault_of
from ..telemetry.logging import redact_value
from .models import TEXT_ERRORS

log = logging.getLogger("alpaca.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:alpaca:problem:"


class Problem(BaseModel):
    """An RFC 9457 problem document; ``code`` is the stable machine-readable reason."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["urn:alpaca:problem:not_found"])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    code: str


class ProblemError(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(self, status: int, code: str, detail: str | None = None, *,
                 title: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail or code)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title
        self.headers = headers
        self.extra = extra


def problem_body(status: int, code: str, detail: str | None, instance: str | None,
                 title: str | None = None, **extra: Any) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body: dict[str, Any] = {"type": TYPE_PREFIX + code, "title": title or phrase,
                            "status": status, "detail": detail, "instance": instance,
                            "code": code}
    body.update(extra)
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, TypeError, ValueError):
        # A detail quoting what the client sent (a workflow line) with a lone surrogate
        # could not be encoded: a 500 instead of the 4xx. U+FFFD takes its place.
        cleaned: dict[str, Any] = redact_value(body, mask_keys=False)
        return cleaned
    return body


def problem(status: int, code: str, detail: str | None = None, *, instance: str | None = None,
            title: str | None = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    return JSONResponse(problem_body(status, code, detail, instance, title, **extra),
                        status_code=status, media_type=PROBLEM_JSON, headers=headers)


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
          413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
          429: "too_many_requests", 500: "internal_error", 503: "unavailable"}


def code_for(status: int) -> str:
    return _CODES.get(status, "error" if status >= 400 else "ok")


def install_problem_handlers(app: FastAPI) -> None:
    """Turn every exception FastAPI would render its own way into a problem document."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return problem(exc.status, exc.code, exc.detail, instance=request.url.path,
                       title=exc.title, headers=exc.headers, **exc.extra)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route for {request.method} {request.url.path}"
        return problem(exc.status_code, code_for(exc.status_code), detail,
                       instance=request.url.path, headers=dict(exc.headers or {}) or None)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        # Text no store can keep gets its own code: clients fix the encoding, not the field.
        special = [e for e in errors if e["type"] in TEXT_ERRORS]
        first = (special or errors)[0] if errors else None
        detail = (f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first
                  else "the request is not valid")
        return problem(422, str(special[0]["type"]) if special else "validation_error", detail,
                       instance=request.url.path, errors=jsonable_encoder(errors))

    async def on_not_found(request: Request, exc: Exception) -> Response:
        return problem(404, "not_found", str(exc), instance=request.url.path)

    async def on_conflict(request: Request, exc: Exception) -> Response:
        return problem(409, "conflict", str(exc), instance=request.url.path)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Unavailable)
        return unavailable(exc, request.url.path, request.scope)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(NotFound, on_not_found)
    app.add_exception_handler(ApprovalConflict, on_conflict)
    app.add_exception_handler(Unavailable, on_unavailable)


RETRY_AFTER_SECONDS = 5


def _api_state(scope: Scope) -> Any:
    return getattr(getattr(scope.get("app"), "state", None), "alpaca", None)


def unavailable(exc: Unavailable, instance: str | None, scope: Scope) -> JSONResponse:
    """503 for a store or Redis fault: the server is fine, a dependency is not (never 500).
    The client reads what kind of fault; the log line names the URL, the cause and the fix."""
    log.warning("%s %s", instance, exc)
    watch = getattr(_api_state(scope), "faults", None)
    if watch is not None and isinstance(exc, StoreUnavailable):
        watch.saw(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.transient else None
    return problem(503, str(exc.code), exc.public, instance=instance, headers=headers,
                   fault=str(exc.fault))


def _fault_in(scope: Scope, exc: Exception) -> Unavailable | None:
    """A driver exception that escaped untyped (e.g. from Redis) classified with the app's
    configured URLs; ``None`` for anything else."""
    cfg = getattr(_api_state(scope), "settings", None)
    return fault_of(exc, getattr(cfg, "database_url", None), getattr(cfg, "redis_url", None),
                    getattr(cfg, "connect_timeout", None))


async def _send_problem(scope: Scope, send: Send, status: int, code: str, detail: str) -> None:
    body = json.dumps(problem_body(status, code, detail, scope.get("path"))).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_JSON.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a streamed body passes the limit (FastAPI re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes: by Content-Length up front, and by counting the
    bytes actually received (a chunked upload has no Content-Length to trust)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _send_problem(scope, send, 400, "bad_request",
                                        "the Content-Length header is not a number")
                    return
                if length > self.limit:
                    await _send_problem(scope, send, 413, "payload_too_large",
                                        f"the request body is larger than {self.limit} bytes")
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_problem(scope, send, 413, "payload_too_large", str(exc.detail))


class InternalErrorMiddleware:
    """The last resort: an unexpected exception becomes a logged 500 problem, never a
    stack trace or a bare text body (and the exception does not escape the server)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            fault = _fault_in(scope, exc)
            if fault is not None:
                if started:  # a stream cut short by the fault: one line, no stack
                    log.warning("%s %s: %s", scope.get("method"), scope.get("path"), fault)
                    return
                response = unavailable(fault, scope.get("path"), scope)
                await response(scope, receive, send)
                return
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
            await _send_problem(scope, send, 500, "internal_error",
                                "the server failed to handle the request; see its log")

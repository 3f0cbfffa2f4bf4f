"""HTTP endpoints as governed tools (DESIGN §1, §9: the ``http:`` entries of a workflow file).

An HTTP tool is a request template: arguments named in the URL (``{city}``) are URL-encoded
into it, the other arguments go to the query string (GET, DELETE) or to a JSON body (POST,
PUT, PATCH). The answer is turned into a value the model can read, and into errors the runner
already knows how to govern: 429 and 5xx raise an error carrying ``.status`` (transient, so the
retry policy applies), other statuses are permanent, oversized bodies are refused before they
are read whole.

Secrets never live in the tool: header values reference environment variables as
``${NAME}``; they are resolved at call time (a key rotated in the environment is picked up
without reloading), registered with the log redactor, and scrubbed from results and error
excerpts (an endpoint that echoes the ``Authorization`` header must not leak it into the journal
or the audit log). ``describe()`` shows header names and the variables they come from, never
values.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from ..telemetry.audit import REDACTED, is_secret_key
from ..telemetry.logging import MIN_SECRET_LENGTH, redact_text, register_secret
from .base import ApprovalRule, Tool, ToolContext
from .breaker import BreakerPolicy
from .contracts import DRAFT, Contract, SchemaError
from .retry import NO_RETRY, RetryPolicy

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_MAX_TEXT_CHARS",
    "METHODS",
    "ClientFactory",
    "HeaderTemplate",
    "HttpConfigError",
    "HttpConnectionError",
    "HttpStatusError",
    "HttpTool",
    "HttpToolError",
    "make_http_tool",
]

DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_MAX_TEXT_CHARS = 16_000
"""Non-JSON bodies are cut here: a model gains nothing from a 1 MiB HTML page but cost."""

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_EXCERPT_CHARS = 300

ClientFactory = Callable[[], httpx.AsyncClient]
"""Makes the client for one call; tests inject one with a ``MockTransport`` or settings."""


# -- errors ------------------------------------------------------------------------------------


class HttpConfigError(ValueError):
    """A tool definition that cannot work; ``loc`` follows the workflow-file layout.

    ``("http", "url")`` or ``("input_schema",)``: the loader prefixes the entry's position and
    reports the line, Python callers get a plain ValueError.
    """

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(f"{'.'.join(loc)}: {message}")
        self.loc = loc
        self.message = message


class HttpToolError(Exception):
    """A call that cannot be made, or an answer that cannot be used; never retried."""


class HttpStatusError(HttpToolError):
    """A non-2xx answer. ``status`` is what ``default_is_transient`` reads: 429/5xx retry."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpConnectionError(HttpToolError, ConnectionError):
    """The endpoint could not be reached; a ConnectionError, so it is transient."""


# -- header templates --------------------------------------------------------------------------


@dataclass(frozen=True)
class HeaderTemplate:
    """One header: its name, its template and the environment variables the template reads."""

    name: str
    template: str
    env: tuple[str, ...]

    @classmethod
    def parse(cls, name: str, template: str) -> HeaderTemplate:
        loc = ("http", "headers", name)
        if not _HEADER_NAME.fullmatch(name):
            raise HttpConfigError(loc, "not a valid HTTP header name")
        if "\r" in template or "\n" in template:
            raise HttpConfigError(loc, "a header value cannot contain line breaks")
        env = tuple(dict.fromkeys(_SECRET_REF.findall(template)))
        if "${" in _SECRET_REF.sub("", template):
            # Never echo the value: it may be a pasted secret.
            raise HttpConfigError(loc, "malformed ${...} reference; write ${ENV_VAR_NAME}")
        if not env and is_secret_key(name):
            raise HttpConfigError(
                loc, "looks like a secret: reference an environment variable instead of "
                     "writing the value, e.g. \"Bearer ${API_TOKEN}\"")
        return cls(name, template, env)

    def describe(self) -> str:
        if self.env:
            return f"<secret from {', '.join(self.env)}>"
        return self.template

    def resolve(self, environ: Mapping[str, str]) -> tuple[str, list[str]]:
        """The header value now, and the secret values it contains."""
        secrets: list[str] = []

        def fill(match: re.Match[str]) -> str:
            var = match.group(1)
            value = environ.get(var)
            if value is None:
                raise HttpToolError(
                    f"environment variable {var} is not set (needed by header {self.name})")
            secrets.append(value)
            return value

        return _SECRET_REF.sub(fill, self.template), secrets


# -- the tool ----------------------------------------------------------------------------------


@dataclass
class HttpTool(Tool):
    """A Tool whose ``describe()`` also tells what it calls, with header names only.

    The extra fields describe the request; the request itself is built by ``invoke`` from the
    same values captured when the tool was made.
    """

    method: str = "GET"
    url_template: str = ""
    headers: tuple[HeaderTemplate, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["http"] = {
            "method": self.method,
            "url": self.url_template,
            "headers": {h.name: h.describe() for h in self.headers},
            "max_response_bytes": self.max_response_bytes,
        }
        return out


def make_http_tool(
    name: str,
    *,
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
    input_schema: dict[str, Any] | None = None,
    output_schema: dict[str, Any] | None = None,
    description: str = "",
    capabilities: Iterable[str] = (),
    retry: RetryPolicy = NO_RETRY,
    breaker: BreakerPolicy | None = None,
    timeout: float | None = 30.0,
    approval: ApprovalRule = "never",
    cost: float = 0.0,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    idempotency_header: str | None = "Idempotency-Key",
    client_factory: ClientFactory | None = None,
) -> HttpTool:
    """An HTTP endpoint as a Tool. Raises ``HttpConfigError`` for a definition that cannot work.

    Without ``input_schema`` the URL placeholders become required scalar arguments and nothing
    else is accepted. ``idempotency_header`` carries the step's idempotency key (the same on
    every retry and resume), so endpoints that honour it execute a call once.
    """
    method = method.upper()
    if method not in METHODS:
        raise HttpConfigError(("http", "method"), f"expected one of {', '.join(METHODS)}")
    placeholders = _placeholders(url)
    if input_schema is None:
        input_schema = _default_input_schema(placeholders)
    _check_schema(("input_schema",), input_schema)
    if output_schema is not None:
        _check_schema(("output_schema",), output_schema)
    _check_placeholders(placeholders, input_schema)
    templates = tuple(HeaderTemplate.parse(k, v) for k, v in (headers or {}).items())
    if max_response_bytes < 1:
        raise HttpConfigError(("http", "max_response_bytes"), "must be at least 1")
    if max_text_chars < 1:
        raise HttpConfigError(("http", "max_text_chars"), "must be at least 1")
    call = _HttpCall(
        method=method, url=url, placeholders=placeholders, headers=templates,
        timeout=timeout, max_response_bytes=max_response_bytes, max_text_chars=max_text_chars,
        idempotency_header=idempotency_header,
        client_factory=client_factory or _default_client,
    )
    return HttpTool(
        name=name,
        description=description or f"{method} {url}",
        input_schema=input_schema,
        output_schema=output_schema,
        invoke=call.invoke,
        capabilities=frozenset(capabilities),
        retry=retry,
        breaker=breaker,
        timeout=timeout,
        approval=approval,
        cost=cost,
        source="http",
        method=method,
        url_template=url,
        headers=templates,
        max_response_bytes=max_response_bytes,
    )


# -- definition checks -------------------------------------------------------------------------


def _placeholders(url: str) -> tuple[str, ...]:
    if not url.startswith(("http://", "https://")):
        raise HttpConfigError(("http", "url"), "expected an http:// or https:// URL")
    if "${" in url:
        raise HttpConfigError(("http", "url"), "secrets belong in headers; a URL is logged "
                                               "and journaled, so it cannot carry ${...}")
    names = _PLACEHOLDER.findall(url)
    for found in names:
        if not _IDENTIFIER.fullmatch(found):
            raise HttpConfigError(("http", "url"), f"placeholder {{{found}}} is not a name")
    rest = _PLACEHOLDER.sub("", url)
    if "{" in rest or "}" in rest:
        raise HttpConfigError(("http", "url"), "unbalanced '{' or '}'")
    host = urlsplit(url).netloc
    if not host or "{" in host:
        # A templated host would let the model choose where the credentials go.
        raise HttpConfigError(("http", "url"), "the host must be fixed; placeholders go in "
                                               "the path or the query")
    return tuple(dict.fromkeys(names))


def _default_input_schema(placeholders: tuple[str, ...]) -> dict[str, Any]:
    scalar = {"type": ["string", "number", "boolean"]}
    return {
        "$schema": DRAFT,
        "type": "object",
        "properties": {name: dict(scalar) for name in placeholders},
        "required": list(placeholders),
        "additionalProperties": False,
    }


def _check_schema(loc: tuple[str, ...], schema: Any) -> None:
    if not isinstance(schema, dict):
        raise HttpConfigError(loc, "expected a JSON Schema mapping")
    try:
        Contract(schema)
    except SchemaError as exc:
        raise HttpConfigError(loc, str(exc)) from None


def _check_placeholders(placeholders: tuple[str, ...], schema: dict[str, Any]) -> None:
    """A placeholder the schema does not require would make some valid calls unsendable."""
    properties = schema.get("properties")
    required = schema.get("required")
    for name in placeholders:
        if not isinstance(properties, dict) or name not in properties \
                or not isinstance(required, list) or name not in required:
            raise HttpConfigError(("input_schema",),
                                  f"URL placeholder {{{name}}} must be a required property")


def _default_client() -> httpx.AsyncClient:
    # Redirects are not followed: a redirect to another host would be a place to send the
    # credentials that nobody reviewed.
    return httpx.AsyncClient(follow_redirects=False)


# -- one call ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HttpCall:
    method: str
    url: str
    placeholders: tuple[str, ...]
    headers: tuple[HeaderTemplate, ...]
    timeout: float | None
    max_response_bytes: int
    max_text_chars: int
    idempotency_header: str | None
    client_factory: ClientFactory

    async def invoke(self, args: dict[str, Any], ctx: ToolContext) -> Any:
        url = self._render_url(args)
        rest = {k: v for k, v in args.items() if k not in self.placeholders}
        headers, secrets = self._resolve_headers()
        if self.idempotency_header and not any(
            h.lower() == self.idempotency_header.lower() for h in headers
        ):
            headers[self.idempotency_header] = ctx.idempotency_key
        where = f"{self.method} {_without_query(url)}"
        params = None if self.method in _BODY_METHODS else _query(rest)
        body = rest if self.method in _BODY_METHODS else None
        timeout = httpx.Timeout(self.timeout) if self.timeout is not None else None
        try:
            async with self.client_factory() as client, client.stream(
                self.method, url, params=params, json=body, headers=headers, timeout=timeout,
            ) as response:
                self._refuse_declared_size(response, where)
                raw = await self._read(response, where)
        except httpx.TimeoutException:
            raise TimeoutError(f"{where}: timed out") from None
        except httpx.TransportError as exc:
            message = f"{where}: {type(exc).__name__}: {exc}"
            raise HttpConnectionError(redact_text(_scrub(message, secrets))) from None
        return self._interpret(response, raw, where, secrets)

    def _render_url(self, args: dict[str, Any]) -> str:
        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in args:
                raise HttpToolError(f"argument {name!r} is needed by the URL")
            return quote(_text(args[name]), safe="")

        return _PLACEHOLDER.sub(fill, self.url)

    def _resolve_headers(self) -> tuple[dict[str, str], list[str]]:
        headers: dict[str, str] = {}
        secrets: list[str] = []
        for template in self.headers:
            value, found = template.resolve(os.environ)
            for secret in found:
                register_secret(secret)
            secrets += found
            headers[template.name] = value
        return headers, secrets

    def _refuse_declared_size(self, response: httpx.Response, where: str) -> None:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_response_bytes:
            raise HttpToolError(f"{where}: response of {declared} bytes exceeds "
                                    f"max_response_bytes={self.max_response_bytes}")

    async def _read(self, response: httpx.Response, where: str) -> bytes:
        """Read at most the limit (decoded size: a small gzip bomb is still refused)."""
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > self.max_response_bytes:
                raise HttpToolError(f"{where}: response exceeds max_response_bytes="
                                        f"{self.max_response_bytes}")
        return bytes(data)

    def _interpret(self, response: httpx.Response, raw: bytes, where: str,
                   secrets: list[str]) -> Any:
        status = response.status_code
        text = raw.decode(response.encoding or "utf-8", errors="replace")
        if 200 <= status < 300:
            if raw and _is_json(response.headers.get("content-type", "")):
                try:
                    return _scrub(json.loads(raw), secrets)  # bytes: UTF-8/16/32 detected
                except ValueError:
                    raise HttpToolError(f"{where}: HTTP {status} declared JSON but the body "
                                            "is not valid JSON") from None
            if len(text) > self.max_text_chars:
                cut = len(text) - self.max_text_chars
                text = text[: self.max_text_chars] + f"\n[truncated: {cut} more characters]"
            return {"status": status, "text": _scrub(text, secrets)}
        excerpt = redact_text(_scrub(" ".join(text.split())[:_EXCERPT_CHARS], secrets))
        if 300 <= status < 400:
            location = redact_text(_scrub(response.headers.get("location", "?"), secrets))
            raise HttpStatusError(status, f"{where}: HTTP {status} redirect to {location} "
                                          "not followed")
        message = f"{where}: HTTP {status}"
        raise HttpStatusError(status, f"{message}: {excerpt}" if excerpt else message)


# -- helpers -----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _query(args: dict[str, Any]) -> list[tuple[str, str | int | float | bool | None]]:
    """Query parameters: lists repeat the key, objects travel as JSON, null is left out."""
    out: list[tuple[str, str | int | float | bool | None]] = []
    for key, value in args.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        out += [(key, _text(item)) for item in items if item is not None]
    return out


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";")[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json")


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _scrub(value: Any, secrets: list[str]) -> Any:
    """Mask secret values wherever an endpoint echoed them; keys and structure stay as sent."""
    usable = sorted({s for s in secrets if len(s.strip()) >= MIN_SECRET_LENGTH},
                    key=len, reverse=True)
    return _scrub_with(value, usable)


def _scrub_with(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [_scrub_with(item, secrets) for item in value]
    if isinstance(value, dict):
        return {_scrub_with(k, secrets): _scrub_with(v, secrets) for k, v in value.items()}
    return value

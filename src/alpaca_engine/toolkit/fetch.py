"""``fetch_page``: read a web page as the research agent needs it (readable text, bounded size).

The URL comes from a model, so it is untrusted input. The guard refuses non-http(s) schemes
always, and by default any host that resolves to a loopback, private, link-local or otherwise
non-public address (SSRF: cloud metadata endpoints, admin consoles, the engine's own API).
Every hop of a redirect chain is checked again, and the connection goes to the very address
that was checked (the URL host is pinned to it, with Host header and TLS SNI kept), so a DNS
answer that changes between check and connect cannot slip through. Environment proxies are
ignored for the same reason.

``ALPACA_FETCH_ALLOW_PRIVATE=1`` lifts the address check (local development, tests against a
server on 127.0.0.1); the scheme check stays. ``ALPACA_FETCH_MAX_BYTES`` caps the body read.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
from dataclasses import dataclass

import httpx
from pydantic import BaseModel, Field

from ..tools.breaker import BreakerPolicy
from ..tools.decorator import tool
from ..tools.retry import RetryPolicy
from .extract import extract_readable
from .net import (
    USER_AGENT,
    IPAddress,
    checked_addresses,
    env_flag,
    parse_http_url,
    transport_error,
    upstream_error,
)

__all__ = ["FetchConfig", "Page", "fetch_page", "fetch_url"]

ALLOW_PRIVATE_ENV = "ALPACA_FETCH_ALLOW_PRIVATE"
MAX_BYTES_ENV = "ALPACA_FETCH_MAX_BYTES"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TEXTUAL = ("text/", "application/xhtml+xml", "application/xml", "application/json")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


class Page(BaseModel):
    """A fetched page: final URL after redirects, HTTP status, title and readable text."""

    url: str
    status: int
    title: str | None = None
    text: str
    truncated: bool = Field(description="the body or the text was cut to the size limits")


@dataclass(frozen=True)
class FetchConfig:
    """Limits for one fetch. ``from_env`` is what the tool uses."""

    allow_private: bool = False
    max_bytes: int = 2_000_000
    max_redirects: int = 5
    timeout: float = 15.0
    connect_timeout: float = 5.0
    user_agent: str = USER_AGENT

    @classmethod
    def from_env(cls) -> FetchConfig:
        raw = os.environ.get(MAX_BYTES_ENV, "").strip()
        max_bytes = int(raw) if raw.isdigit() and int(raw) > 0 else cls.max_bytes
        return cls(allow_private=env_flag(ALLOW_PRIVATE_ENV), max_bytes=max_bytes)


@dataclass(frozen=True)
class _Body:
    status: int
    content_type: str
    charset: str | None
    location: str | None
    data: bytes
    cut: bool


def _is_textual(content_type: str) -> bool:
    return not content_type or content_type.startswith(_TEXTUAL) or content_type.endswith(
        ("+xml", "+json")
    )


def _pinned(url: httpx.URL, ip: IPAddress) -> httpx.URL:
    return url.copy_with(host=str(ip))


async def _addresses(url: httpx.URL, config: FetchConfig) -> list[IPAddress]:
    return await checked_addresses(url, allow_private=config.allow_private,
                                   setting=ALLOW_PRIVATE_ENV)


async def _get(client: httpx.AsyncClient, url: httpx.URL, config: FetchConfig) -> _Body:
    """One GET without following redirects, to a checked address, reading at most max_bytes."""
    addresses = await _addresses(url, config)
    headers = {"Host": url.netloc.decode("ascii")}
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    what = f"GET {url.host}"
    last: httpx.TransportError | None = None
    for ip in addresses:
        try:
            async with client.stream(
                "GET", _pinned(url, ip), headers=headers, extensions=extensions
            ) as resp:
                content_type = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                data = bytearray()
                cut = False
                if resp.status_code not in _REDIRECTS and _is_textual(content_type):
                    async for chunk in resp.aiter_bytes():
                        data += chunk
                        if len(data) > config.max_bytes:
                            del data[config.max_bytes :]
                            cut = True
                            break
                return _Body(resp.status_code, content_type, resp.charset_encoding,
                             resp.headers.get("location"), bytes(data), cut)
        except httpx.ConnectError as exc:
            last = exc  # try the host's next address (IPv6 first, server on IPv4 ...)
        except httpx.TransportError as exc:
            raise transport_error(what, exc) from None
    assert last is not None
    raise transport_error(what, last) from None


def _decode(body: _Body) -> str:
    charset = body.charset
    if not charset:
        match = _META_CHARSET.search(body.data[:4096])
        charset = match.group(1).decode("ascii") if match else None
    try:
        codecs.lookup(charset or "utf-8")
    except LookupError:
        charset = None
    return body.data.decode(charset or "utf-8", errors="replace")


def _looks_like_html(content_type: str, text: str) -> bool:
    if "html" in content_type:
        return True
    return not content_type and text.lstrip()[:1] == "<"


async def fetch_url(url: str, max_chars: int = 8000, config: FetchConfig | None = None) -> Page:
    """Fetch ``url`` under the guard and limits of ``config`` (default: from the environment)."""
    config = config or FetchConfig.from_env()
    current = parse_http_url(url)
    timeout = httpx.Timeout(config.timeout, connect=config.connect_timeout)
    async with httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        headers={
            "User-Agent": config.user_agent,
            "Accept": "text/html,application/xhtml+xml,text/plain;q=0.9,*/*;q=0.5",
        },
    ) as client:
        for _hop in range(config.max_redirects + 1):
            body = await _get(client, current, config)
            if body.status in _REDIRECTS and body.location:
                current = parse_http_url(str(current.join(body.location)))
                continue
            break
        else:
            raise upstream_error(
                f"GET {current.host}: more than {config.max_redirects} redirects", transient=False
            )
    if body.status == 429 or body.status >= 500:
        raise upstream_error(f"GET {current.host} answered HTTP {body.status}", status=body.status)
    if not _is_textual(body.content_type):
        raise upstream_error(
            f"GET {current.host}: unsupported content type {body.content_type!r} "
            "(only text, HTML, XML and JSON pages are read)",
            transient=False,
        )
    raw = _decode(body)
    title: str | None = None
    if _looks_like_html(body.content_type, raw):
        readable = await asyncio.to_thread(extract_readable, raw, str(current))
        title, text = readable.title, readable.text
    else:
        text = raw.strip()
    truncated = body.cut or len(text) > max_chars
    return Page(url=str(current), status=body.status, title=title, text=text[:max_chars],
                truncated=truncated)


@tool(
    capabilities=["net:fetch"],
    retry=RetryPolicy(max_attempts=3, initial_delay=0.5, max_delay=5.0),
    breaker=BreakerPolicy(),
    timeout=45.0,
)
async def fetch_page(
    url: str = Field(description="absolute http(s) URL of the page", max_length=4096),
    max_chars: int = Field(8000, ge=100, le=100_000, description="cap on returned text"),
) -> Page:
    """Fetch a web page and return its readable text (menus, scripts and footers removed).

    4xx pages are returned with their status so the model can react; 429 and 5xx raise a
    transient error so the engine's retry policy applies.
    """
    return await fetch_url(url, max_chars)

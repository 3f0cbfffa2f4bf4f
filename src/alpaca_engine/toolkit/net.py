"""HTTP plumbing shared by the toolkit: errors the retry policy understands, and the SSRF guard.

Errors carry ``status`` (the HTTP code, or None) and ``transient`` so that the engine's
``default_is_transient`` retries 429/5xx, timeouts and refused connections and nothing else.
Messages are written here, never copied from httpx, because httpx puts the full URL (which may
hold a secret token) into its exception text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Callable
from importlib import metadata

import httpx

from ..tools.retry import TransientError

__all__ = [
    "USER_AGENT",
    "GuardedTransport",
    "IPAddress",
    "ToolConfigError",
    "TransientUpstreamError",
    "URLNotAllowed",
    "UpstreamError",
    "checked_addresses",
    "env_flag",
    "is_public_address",
    "parse_http_url",
    "resolve_host",
    "transport_error",
    "upstream_error",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _version() -> str:
    try:
        return metadata.version("alpaca-engine")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0"


USER_AGENT = f"alpaca-engine/{_version()} (agent toolkit; +python-httpx)"


class UpstreamError(Exception):
    """A remote service failed. ``status``/``transient`` tell the retry policy what to do."""

    def __init__(self, message: str, *, status: int | None = None, transient: bool = False):
        super().__init__(message)
        self.status = status
        self.transient = transient


class TransientUpstreamError(UpstreamError, TransientError):
    """An upstream failure worth retrying (429, 5xx, timeout, refused connection)."""


class URLNotAllowed(ValueError):
    """The URL is refused before any packet is sent: bad scheme or a non-public address."""

    transient = False


class ToolConfigError(RuntimeError):
    """The tool is not configured (missing or malformed environment variable)."""

    transient = False


def upstream_error(
    message: str, *, status: int | None = None, transient: bool | None = None
) -> UpstreamError:
    """Build the right error class: 429 and 5xx are transient unless told otherwise."""
    if transient is None:
        transient = status is not None and (status == 429 or status >= 500)
    cls = TransientUpstreamError if transient else UpstreamError
    return cls(message, status=status, transient=transient)


def transport_error(what: str, exc: httpx.TransportError) -> UpstreamError:
    """Describe a network failure without echoing the URL httpx puts in its message."""
    if isinstance(exc, httpx.UnsupportedProtocol):
        return upstream_error(f"{what}: unsupported protocol", transient=False)
    if isinstance(exc, httpx.TimeoutException):
        reason = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        reason = "connection failed"
    else:
        reason = f"network error ({type(exc).__name__})"
    return upstream_error(f"{what}: {reason}", transient=True)


def env_flag(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable (1/true/yes/on)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def parse_http_url(url: str) -> httpx.URL:
    """Parse ``url`` and refuse anything but absolute http(s) URLs (file:, ftp:, data: ...)."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise URLNotAllowed(f"not a valid URL: {exc}") from None
    if parsed.scheme not in {"http", "https"}:
        scheme = parsed.scheme or "(none)"
        raise URLNotAllowed(f"only http and https URLs are allowed, not {scheme!r}")
    if not parsed.host:
        raise URLNotAllowed("the URL has no host")
    if parsed.userinfo:
        raise URLNotAllowed("URLs with embedded credentials are not allowed")
    return parsed


def is_public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses; loopback, private, link-local are not."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """All addresses ``host`` resolves to, in resolver order, without duplicates."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise upstream_error(
            f"could not resolve host {host!r}", transient=exc.errno == socket.EAI_AGAIN
        ) from None
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    if not out:  # pragma: no cover - getaddrinfo raises instead
        raise upstream_error(f"could not resolve host {host!r}")
    return out


async def checked_addresses(url: httpx.URL, *, allow_private: bool, setting: str,
                            verb: str = "fetch") -> list[IPAddress]:
    """The addresses ``url``'s host resolves to, refusing (``URLNotAllowed``) any non-public
    one unless ``allow_private``; ``setting`` is the variable that would allow it."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await resolve_host(host, port)
    if not allow_private:
        # One non-public answer is enough to refuse: a mixed answer is a rebinding trick.
        blocked = [ip for ip in addresses if not is_public_address(ip)]
        if blocked:
            raise URLNotAllowed(
                f"refusing to {verb} {url.host!r}: it resolves to a non-public address "
                f"({blocked[0]}); set {setting}=1 to allow private networks"
            )
    return addresses


class GuardedTransport(httpx.AsyncBaseTransport):
    """The SSRF guard of ``fetch_page`` for any httpx client: every request's host is
    resolved and checked, and the connection goes to the checked address (Host header and
    TLS SNI keep the name), so a DNS answer that changes between check and connect cannot
    slip through. ``allow_private`` is asked per request (the operator's setting may change).
    """

    def __init__(self, allow_private: Callable[[], bool], setting: str,
                 inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.allow_private = allow_private
        self.setting = setting
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        addresses = await checked_addresses(url, allow_private=self.allow_private(),
                                            setting=self.setting, verb="call")
        extensions = dict(request.extensions)
        if url.scheme == "https":
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        last: httpx.ConnectError | None = None
        for ip in addresses:
            pinned = httpx.Request(request.method, url.copy_with(host=str(ip)),
                                   headers=request.headers, stream=request.stream,
                                   extensions=extensions)
            try:
                return await self.inner.handle_async_request(pinned)
            except httpx.ConnectError as exc:
                last = exc  # the host's next address (IPv6 first, server on IPv4 ...)
        assert last is not None
        raise last

    async def aclose(self) -> None:
        await self.inner.aclose()

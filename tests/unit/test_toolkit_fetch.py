"""fetch_page against a real local HTTP server: extraction, retries, caps, redirects, SSRF."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from alpaca_engine.clock import FakeClock
from alpaca_engine.toolkit import (
    FetchConfig,
    UpstreamError,
    URLNotAllowed,
    extract_readable,
    fetch_page,
    fetch_url,
    html_to_text,
)
from alpaca_engine.toolkit import net as net_mod
from alpaca_engine.toolkit.net import is_public_address
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.retry import TransientError, call_with_retry, default_is_transient
from tests.unit.toolkit_fixtures.server import LocalServer, Reply, sequence, serve

ARTICLE = (Path(__file__).parent / "toolkit_fixtures" / "article.html").read_text()
CTX = ToolContext(run_id="r", step=1, idempotency_key="r:1")
HUGE = "<html><body><article>" + "<p>alpaca fibre paragraph. " * 200_000 + "</article></body>"


def _routes() -> dict[str, Any]:
    return {
        "/article": lambda _r: Reply(body=ARTICLE),
        "/flaky": sequence(Reply(503, "busy", content_type="text/plain"), Reply(body=ARTICLE)),
        "/limited": sequence(Reply(429, "slow down", content_type="text/plain")),
        "/missing": lambda _r: Reply(404, "<html><title>Nope</title><p>No such page</p></html>"),
        "/huge": lambda _r: Reply(body=HUGE),
        "/plain": lambda _r: Reply(body="just text\nline two", content_type="text/plain"),
        "/old": lambda _r: Reply(302, headers={"Location": "/article"}),
        "/loop": lambda _r: Reply(302, headers={"Location": "/loop"}),
        "/to-file": lambda _r: Reply(302, headers={"Location": "file:///etc/passwd"}),
        "/image": lambda _r: Reply(body=b"\x89PNG\r\n\x1a\n", content_type="image/png"),
        "/slow": lambda _r: _slow(Reply(body=ARTICLE)),
        "/weird-charset": lambda _r: Reply(body="<p>caf\xc3\xa9</p>".encode("latin-1"),
                                           content_type="text/html; charset=no-such-codec"),
        "/latin1": lambda _r: Reply(
            body="<html><head><meta charset='iso-8859-1'><title>Caf\xe9</title></head>"
            "<body><p>Caf\xe9 cr\xe8me</p></body></html>".encode("latin-1"),
            content_type="text/html",
        ),
    }


def _slow(reply: Reply) -> Reply:
    time.sleep(1.0)
    return reply


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with serve(_routes()) as srv:
        yield srv


@pytest.fixture
def allow_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_FETCH_ALLOW_PRIVATE", "1")


async def _invoke(url: str, **args: Any) -> dict[str, Any]:
    result: dict[str, Any] = await fetch_page.invoke({"url": url, **args}, CTX)
    assert fetch_page.output_errors(result) == []
    return result


# --------------------------------------------------------------------------- contract


def test_tool_contract() -> None:
    assert fetch_page.capabilities == frozenset({"net:fetch"})
    assert fetch_page.approval == "never"
    assert fetch_page.retry.max_attempts >= 2
    assert fetch_page.input_schema["required"] == ["url"]
    props = fetch_page.output_schema["properties"] if fetch_page.output_schema else {}
    assert set(props) == {"url", "status", "title", "text", "truncated"}


async def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValidationError):
        await fetch_page.invoke({"url": "http://x", "max_chars": 1}, CTX)
    with pytest.raises(ValidationError):
        await fetch_page.invoke({"url": "http://x", "extra": 1}, CTX)


# --------------------------------------------------------------------------- readable text


@pytest.mark.usefixtures("allow_local")
async def test_article_text_without_navigation(server: LocalServer) -> None:
    page = await _invoke(server.url("/article"))
    assert page["status"] == 200
    assert page["title"] == "Alpaca fibre: a field guide"
    assert page["truncated"] is False
    assert page["url"] == server.url("/article")
    text = page["text"]
    assert "Alpacas are domesticated camelids" in text
    assert "contains no lanolin" in text
    for boilerplate in ("Herd Store", "Member Login", "Newsletter", "Main menu", "Cookie",
                        "TRACKING-SCRIPT", "font-family"):
        assert boilerplate not in text
    ua = server.hits("/article")[0].headers["User-Agent"]
    assert ua.startswith("alpaca-engine/")


def test_fallback_when_extraction_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trafilatura.extract", lambda *a, **k: None)
    readable = extract_readable(ARTICLE)
    assert readable.title == "Alpaca fibre: a field guide"
    assert "Alpacas are domesticated camelids" in readable.text
    assert "TRACKING-SCRIPT" not in readable.text  # scripts and styles never count as text
    assert "font-family" not in readable.text


def test_fallback_survives_extractor_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any, **_k: Any) -> str:
        raise RuntimeError("bad tree")

    monkeypatch.setattr("trafilatura.extract", boom)
    assert "camelids" in extract_readable(ARTICLE).text


def test_html_to_text_keeps_blocks_apart() -> None:
    text = html_to_text("<div>one</div><div>two<br>three</div><script>x()</script>&amp; four")
    assert text.split("\n") == ["one", "two", "three", "& four"]
    assert extract_readable("").text == ""


@pytest.mark.usefixtures("allow_local")
async def test_plain_text_and_charset(server: LocalServer) -> None:
    plain = await _invoke(server.url("/plain"))
    assert plain["text"] == "just text\nline two"
    assert plain["title"] is None
    latin = await _invoke(server.url("/latin1"))
    assert latin["title"] == "Café"
    assert "Café crème" in latin["text"]


async def test_unknown_charset_falls_back_to_utf8(server: LocalServer) -> None:
    config = FetchConfig(allow_private=True)
    page = await fetch_url(server.url("/weird-charset"), config=config)
    assert page.text == "café"


# --------------------------------------------------------------------------- status handling


async def test_read_timeout_is_transient(server: LocalServer) -> None:
    config = FetchConfig(allow_private=True, timeout=0.2)
    with pytest.raises(UpstreamError, match="timed out") as info:
        await fetch_url(server.url("/slow"), config=config)
    assert default_is_transient(info.value)
    assert str(server.port) not in str(info.value)


@pytest.mark.usefixtures("allow_local")
async def test_503_is_transient_and_retry_policy_recovers(server: LocalServer) -> None:
    clock = FakeClock()
    errors: list[BaseException] = []

    async def on_retry(_n: int, exc: BaseException, _delay: float) -> None:
        errors.append(exc)

    page = await call_with_retry(
        lambda _n: _invoke(server.url("/flaky")), fetch_page.retry, clock=clock,
        on_retry=on_retry,
    )
    assert "camelids" in page["text"]
    assert len(server.hits("/flaky")) == 2
    [err] = errors
    assert isinstance(err, UpstreamError) and isinstance(err, TransientError)
    assert err.status == 503
    assert default_is_transient(err)
    assert len(clock.sleeps) == 1


@pytest.mark.usefixtures("allow_local")
async def test_429_is_transient(server: LocalServer) -> None:
    with pytest.raises(UpstreamError) as info:
        await _invoke(server.url("/limited"))
    assert info.value.status == 429
    assert default_is_transient(info.value)


@pytest.mark.usefixtures("allow_local")
async def test_404_comes_back_as_a_page(server: LocalServer) -> None:
    page = await _invoke(server.url("/missing"))
    assert page["status"] == 404
    assert "No such page" in page["text"]


@pytest.mark.usefixtures("allow_local")
async def test_binary_content_is_refused(server: LocalServer) -> None:
    with pytest.raises(UpstreamError, match="content type") as info:
        await _invoke(server.url("/image"))
    assert not default_is_transient(info.value)


# --------------------------------------------------------------------------- size caps


@pytest.mark.usefixtures("allow_local")
async def test_huge_page_is_truncated_to_max_chars(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_FETCH_MAX_BYTES", "300000")  # keep extraction quick
    page = await _invoke(server.url("/huge"), max_chars=500)
    assert page["truncated"] is True
    assert 0 < len(page["text"]) <= 500
    assert page["text"].startswith("alpaca fibre paragraph.")


@pytest.mark.usefixtures("allow_local")
async def test_body_size_cap_stops_reading(server: LocalServer) -> None:
    assert len(HUGE) > 5_000_000
    config = FetchConfig(allow_private=True, max_bytes=20_000)
    page = await fetch_url(server.url("/huge"), max_chars=100_000, config=config)
    assert page.truncated is True
    assert len(page.text) <= 20_000


async def test_size_cap_from_environment(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_FETCH_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("ALPACA_FETCH_MAX_BYTES", "10000")
    page = await _invoke(server.url("/huge"), max_chars=100_000)
    assert page["truncated"] is True
    assert len(page["text"]) <= 10_000


# --------------------------------------------------------------------------- redirects


@pytest.mark.usefixtures("allow_local")
async def test_redirect_is_followed(server: LocalServer) -> None:
    page = await _invoke(server.url("/old"))
    assert page["url"] == server.url("/article")
    assert page["status"] == 200
    assert "camelids" in page["text"]


@pytest.mark.usefixtures("allow_local")
async def test_redirect_loop_is_limited(server: LocalServer) -> None:
    with pytest.raises(UpstreamError, match="redirects") as info:
        await _invoke(server.url("/loop"))
    assert not default_is_transient(info.value)
    assert len(server.hits("/loop")) == FetchConfig().max_redirects + 1


@pytest.mark.usefixtures("allow_local")
async def test_redirect_to_file_scheme_is_refused(server: LocalServer) -> None:
    with pytest.raises(URLNotAllowed, match="file"):
        await _invoke(server.url("/to-file"))


async def test_every_redirect_hop_is_checked(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A public page must not bounce the fetcher into a private address."""
    monkeypatch.delenv("ALPACA_FETCH_ALLOW_PRIVATE", raising=False)
    monkeypatch.setattr(net_mod, "is_public_address", lambda ip: str(ip) == "127.0.0.1")
    server.routes["/bounce"] = lambda _r: Reply(
        302, headers={"Location": f"http://127.0.0.2:{server.port}/article"}
    )
    with pytest.raises(URLNotAllowed, match=r"127\.0\.0\.2"):
        await _invoke(server.url("/bounce"))
    assert server.hits("/bounce") and not server.hits("/article")


# --------------------------------------------------------------------------- SSRF guard


async def test_guard_refuses_loopback_by_default(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ALPACA_FETCH_ALLOW_PRIVATE", raising=False)
    for url in (server.url("/article"), f"http://localhost:{server.port}/article",
                f"http://[::1]:{server.port}/article", f"http://2130706433:{server.port}/article"):
        with pytest.raises(URLNotAllowed, match="non-public") as info:
            await _invoke(url)
        assert not default_is_transient(info.value)
    assert server.requests == []  # refused before any packet was sent


@pytest.mark.usefixtures("allow_local")
async def test_localhost_name_is_resolved_and_pinned(server: LocalServer) -> None:
    page = await _invoke(f"http://localhost:{server.port}/article")
    assert page["url"] == f"http://localhost:{server.port}/article"
    assert server.hits("/article")[0].headers["Host"] == f"localhost:{server.port}"


@pytest.mark.usefixtures("allow_local")
@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/x", "javascript:alert(1)", "data:text/html,hi",
    "gopher://127.0.0.1:70/", "/relative/path", "http://user:pw@example.com/", "http://",
])
async def test_non_http_urls_are_always_refused(url: str) -> None:
    with pytest.raises(URLNotAllowed):
        await _invoke(url)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
])
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


async def test_connection_refused_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_FETCH_ALLOW_PRIVATE", "1")
    with serve({}) as srv:
        port = srv.port
    with pytest.raises(UpstreamError, match="connection failed") as info:
        await _invoke(f"http://127.0.0.1:{port}/gone")
    assert default_is_transient(info.value)
    assert str(port) not in str(info.value)

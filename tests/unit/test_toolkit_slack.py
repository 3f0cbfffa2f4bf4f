"""notify_slack against a local webhook: payload, secrecy, exactly-once, transient errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from alpaca_engine.clock import FakeClock
from alpaca_engine.telemetry.logging import clear_secrets, redact_text
from alpaca_engine.toolkit import (
    IdempotencyLedger,
    ToolConfigError,
    UpstreamError,
    notify_slack,
)
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.retry import call_with_retry, default_is_transient
from tests.unit.toolkit_fixtures.server import LocalServer, Reply, sequence, serve

TOKEN_PATH = "/services/T000TEST/B000TEST/xoxsecrettoken123"
CTX = ToolContext(run_id="r", step=1, idempotency_key="r:1")


@pytest.fixture
def slack() -> Iterator[LocalServer]:
    ok = Reply(body="ok", content_type="text/plain")
    routes: dict[str, Any] = {
        TOKEN_PATH: lambda _r: ok,
        "/flaky" + TOKEN_PATH: sequence(Reply(500, "internal_error", content_type="text/plain"),
                                        ok),
        "/down" + TOKEN_PATH: lambda _r: Reply(500, "internal_error", content_type="text/plain"),
        "/gone" + TOKEN_PATH: lambda _r: Reply(404, "channel_not_found",
                                               content_type="text/plain"),
        "/slow" + TOKEN_PATH: lambda _r: _slow(ok),
    }
    with serve(routes) as srv:
        yield srv


def _slow(reply: Reply) -> Reply:
    time.sleep(0.3)
    return reply


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ALPACA_IDEMPOTENCY_DB", str(tmp_path / "ledger.db"))
    monkeypatch.delenv("ALPACA_SLACK_WEBHOOK_URL", raising=False)
    yield
    clear_secrets()


def _use(monkeypatch: pytest.MonkeyPatch, server: LocalServer, prefix: str = "") -> str:
    url = server.url(prefix + TOKEN_PATH)
    monkeypatch.setenv("ALPACA_SLACK_WEBHOOK_URL", url)
    return url


async def _notify(args: dict[str, Any], ctx: ToolContext = CTX) -> dict[str, Any]:
    result: dict[str, Any] = await notify_slack.invoke(args, ctx)
    assert notify_slack.output_errors(result) == []
    return result


def test_tool_contract() -> None:
    assert notify_slack.capabilities == frozenset({"notify:slack"})
    assert notify_slack.approval == "required"
    assert notify_slack.input_schema["required"] == ["text"]
    assert "ctx" not in notify_slack.input_schema["properties"]


async def test_posts_json_body(slack: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _use(monkeypatch, slack)
    result = await _notify({"text": "Report ready <!channel> & <https://evil|click>",
                            "channel": "#research"})
    assert result == {"ok": True, "status": 200, "channel": "#research",
                      "idempotency_key": "r:1", "deduplicated": False}
    [request] = slack.hits(TOKEN_PATH)
    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == "r:1"
    assert request.json() == {
        "text": "Report ready &lt;!channel&gt; &amp; &lt;https://evil|click&gt;",
        "channel": "#research",
    }
    assert url not in str(result) and "xoxsecrettoken123" not in str(result)
    assert redact_text(f"posting to {url}") == "posting to ***"  # registered as a secret


async def test_channel_is_optional(slack: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, slack)
    result = await _notify({"text": "hello"})
    assert result["channel"] is None
    assert slack.hits(TOKEN_PATH)[0].json() == {"text": "hello"}


async def test_same_idempotency_key_posts_once(
    slack: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, slack)
    first = await _notify({"text": "once"})
    again = await _notify({"text": "once"})  # an engine retry or a resume after a crash
    assert len(slack.hits(TOKEN_PATH)) == 1
    assert first["deduplicated"] is False
    assert again == {**first, "deduplicated": True}
    other = ToolContext(run_id="r", step=2, idempotency_key="r:2")
    await _notify({"text": "once"}, other)  # a different step is a different message
    assert len(slack.hits(TOKEN_PATH)) == 2


async def test_concurrent_calls_with_same_key_post_once(
    slack: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, slack, "/slow")
    results = await asyncio.gather(*(_notify({"text": "race"}) for _ in range(3)))
    assert len(slack.hits("/slow" + TOKEN_PATH)) == 1
    assert sorted(r["deduplicated"] for r in results) == [False, True, True]


async def test_500_is_transient_and_not_recorded(
    slack: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _use(monkeypatch, slack, "/down")
    with pytest.raises(UpstreamError) as info:
        await _notify({"text": "hi"})
    err = info.value
    assert err.status == 500 and default_is_transient(err)
    assert "internal_error" in str(err)
    assert url not in str(err) and "xoxsecrettoken123" not in str(err)
    assert slack.base not in str(err)
    ledger = IdempotencyLedger.from_env()
    assert ledger.status("slack:r:1") is None  # a failed post may be retried


async def test_retry_policy_recovers_from_500(
    slack: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, slack, "/flaky")
    clock = FakeClock()
    result = await call_with_retry(lambda _n: _notify({"text": "hi"}), notify_slack.retry,
                                   clock=clock)
    assert result["ok"] is True and result["deduplicated"] is False
    assert len(slack.hits("/flaky" + TOKEN_PATH)) == 2 and len(clock.sleeps) == 1
    await _notify({"text": "hi"})
    assert len(slack.hits("/flaky" + TOKEN_PATH)) == 2  # recorded after success


async def test_4xx_is_permanent_and_says_why(
    slack: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _use(monkeypatch, slack, "/gone")
    with pytest.raises(UpstreamError, match="channel_not_found") as info:
        await _notify({"text": "hi"})
    assert not default_is_transient(info.value)
    assert url not in str(info.value)


async def test_unreachable_webhook_is_transient_and_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serve({}) as srv:
        url = srv.url(TOKEN_PATH)
    monkeypatch.setenv("ALPACA_SLACK_WEBHOOK_URL", url)
    with pytest.raises(UpstreamError) as info:
        await _notify({"text": "hi"})
    assert default_is_transient(info.value)
    text = str(info.value) + repr(info.value)
    assert "xoxsecrettoken123" not in text and srv.base not in text
    assert info.value.__suppress_context__  # the httpx error (with the URL) is not shown


async def test_missing_or_bad_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ToolConfigError, match="ALPACA_SLACK_WEBHOOK_URL"):
        await _notify({"text": "hi"})
    monkeypatch.setenv("ALPACA_SLACK_WEBHOOK_URL", "ftp://hooks.example/services/T/B/secret")
    with pytest.raises(ToolConfigError) as info:
        await _notify({"text": "hi"})
    assert "secret" not in str(info.value)
    assert not default_is_transient(info.value)

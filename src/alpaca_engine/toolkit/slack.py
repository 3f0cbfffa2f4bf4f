"""``notify_slack``: the notification agent's gated, exactly-once Slack post.

* Gated: ``approval="required"`` by default, so a supervisor sees the exact text before it goes
  out (DESIGN §5). A workflow file may relax it.
* Exactly once: the post runs inside :meth:`IdempotencyLedger.once` under the step's
  idempotency key, so an engine retry or a resume after a crash returns the first delivery
  instead of posting again. The key is also sent as an ``Idempotency-Key`` header for proxies
  that honour it (Slack itself does not).
* Secret-safe: the webhook URL (``ALPACA_SLACK_WEBHOOK_URL``) *is* the credential. It is
  registered with the log redactor and never appears in a result or an error message.
* Injection-safe: ``&``, ``<`` and ``>`` are escaped as Slack asks, so model-written text cannot
  ping ``<!channel>`` or disguise a link.
"""

from __future__ import annotations

import os

import httpx
from pydantic import BaseModel, Field

from ..telemetry.logging import redact_text, register_secret
from ..tools.base import ToolContext
from ..tools.breaker import BreakerPolicy
from ..tools.decorator import tool
from ..tools.retry import RetryPolicy
from .idempotency import IdempotencyLedger
from .net import USER_AGENT, ToolConfigError, transport_error, upstream_error

__all__ = ["WEBHOOK_ENV", "Delivery", "escape_slack", "notify_slack", "post_to_slack"]

WEBHOOK_ENV = "ALPACA_SLACK_WEBHOOK_URL"


class Delivery(BaseModel):
    """What happened to the message; ``deduplicated`` means an earlier call already posted it."""

    ok: bool
    status: int
    channel: str | None = None
    idempotency_key: str
    deduplicated: bool = False


def escape_slack(text: str) -> str:
    """Escape Slack's control characters so text shows as written and triggers nothing."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _webhook_url() -> str:
    url = (os.environ.get(WEBHOOK_ENV) or "").strip()
    if not url:
        raise ToolConfigError(f"{WEBHOOK_ENV} is not set: no Slack webhook to post to")
    register_secret(url)
    parsed = httpx.URL(url)
    if len(parsed.path) >= 16:  # the token part, should something log the path alone
        register_secret(parsed.path)
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise ToolConfigError(f"{WEBHOOK_ENV} must be an http(s) URL")
    return url


async def post_to_slack(
    webhook_url: str, text: str, channel: str | None, idempotency_key: str,
    http_timeout: float = 10.0,
) -> Delivery:
    """POST one message to an incoming webhook; errors never mention the URL."""
    payload: dict[str, str] = {"text": escape_slack(text)}
    if channel:
        payload["channel"] = channel
    headers = {"User-Agent": USER_AGENT, "Idempotency-Key": idempotency_key}
    try:
        async with httpx.AsyncClient(timeout=http_timeout) as client:
            resp = await client.post(webhook_url, json=payload, headers=headers)
    except httpx.TransportError as exc:
        raise transport_error("slack webhook", exc) from None
    if resp.status_code >= 300:
        # Slack answers a short code (invalid_payload, channel_not_found ...): worth showing.
        reason = redact_text(resp.text[:100].strip()) or resp.reason_phrase
        raise upstream_error(f"slack webhook answered HTTP {resp.status_code}: {reason}",
                             status=resp.status_code)
    return Delivery(ok=True, status=resp.status_code, channel=channel,
                    idempotency_key=idempotency_key)


@tool(
    capabilities=["notify:slack"],
    retry=RetryPolicy(max_attempts=3, initial_delay=1.0, max_delay=10.0),
    breaker=BreakerPolicy(),
    timeout=30.0,
    approval="required",
)
async def notify_slack(
    text: str = Field(min_length=1, max_length=40_000, description="message text"),
    channel: str | None = Field(None, max_length=80,
                                description="channel override (legacy webhooks only)"),
    *,
    ctx: ToolContext,
) -> Delivery:
    """Post a message to the team's Slack channel (gated; posts once per step)."""
    url = _webhook_url()
    ledger = IdempotencyLedger.from_env()
    ran = False

    async def post() -> dict[str, object]:
        nonlocal ran
        ran = True
        delivery = await post_to_slack(url, text, channel, ctx.idempotency_key)
        return delivery.model_dump(mode="json")

    stored = await ledger.once(f"slack:{ctx.idempotency_key}", post)
    return Delivery.model_validate({**stored, "deduplicated": not ran})

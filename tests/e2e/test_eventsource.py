"""The run event stream as a browser's own EventSource sees it (Chromium, the WHATWG client).

``onmessage`` must see every event; after a server restart the EventSource reconnects with
Last-Event-ID and resumes without a gap or a duplicate; after ``end`` its reconnect gets 204
and it stops for good. Connections are counted from the browser's own requests.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from alpaca_engine.api.events import parse_cursor
from tests.e2e.test_web_ui import CHROMIUM_ARGS, chromium  # noqa: F401  (the fixture)
from tests.helpers import alpaca_serve, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

OPEN = """url => {
  window.__messages = []; window.__opens = 0;
  const es = new EventSource(url);
  window.__es = es;
  es.onopen = () => { window.__opens += 1; };
  es.onmessage = (e) => window.__messages.push({ id: e.lastEventId, data: JSON.parse(e.data) });
}"""
CLOSED = 2  # EventSource.CLOSED


def wait_for(check: Callable[[], Any], what: str, seconds: float = 90) -> Any:
    """Poll ``check`` until it returns something truthy (generous: the machine is busy)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Browser:
    """One Chromium page on the server's origin, recording every request to a stream."""

    def __init__(self, playwright: Any, executable: Path) -> None:
        self.browser = playwright.chromium.launch(executable_path=str(executable),
                                                  headless=True, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page()
        self._requests: list[Any] = []
        self.statuses: list[int] = []
        self.page.on("request", lambda r: self._requests.append(r) if "/events" in r.url
                     else None)
        self.page.on("response", lambda r: self.statuses.append(r.status)
                     if "/events" in r.url else None)

    def open(self, base: str, path: str) -> None:
        self.page.goto(base + "/healthz")  # any page of the origin: the stream is same-origin
        self.page.evaluate(OPEN, path)

    @property
    def requests(self) -> list[str | None]:
        """The Last-Event-ID each connection attempt sent (None: it sent none)."""
        return [r.all_headers().get("last-event-id") for r in self._requests]

    def messages(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.page.evaluate("window.__messages")
        return found

    def state(self) -> int:
        return int(self.page.evaluate("window.__es.readyState"))


def serve_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/es.db",
           "ALPACA_POLL_INTERVAL": "0.05"}
    env.pop("ALPACA_REDIS_URL", None)
    return env


def test_onmessage_sees_every_record_and_the_client_stops_after_the_end(
        chromium: Path, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    with alpaca_serve(serve_env(tmp_path), "--workflow", "builtin:quickstart") as base, \
            sync_playwright() as p:
        run = httpx.post(f"{base}/v1/runs?wait=true", timeout=60, json={
            "agent": "researcher", "input": "When did Alpaca 1.0 ship?"}).json()
        audit = httpx.get(f"{base}/v1/runs/{run['id']}/audit").json()["items"]
        b = Browser(p, chromium)
        try:
            b.open(base, f"/v1/runs/{run['id']}/events")
            wait_for(lambda: b.state() == CLOSED, "the EventSource to stop")
            messages = b.messages()
            *records, end = messages
            assert [m["data"]["record"] for m in records] == audit
            assert [m["id"] for m in records] == [str(a["seq"]) for a in audit]
            assert end["data"]["type"] == "end" and end["data"]["state"] == "succeeded"
            # One stream, then one reconnect that says "nothing more" (204): two connections.
            assert b.statuses == [200, 204]
            assert b.requests == [None, str(len(audit))]
            time.sleep(4)  # longer than the reconnection delay: a stopped client stays stopped
            assert (len(b.requests), b.page.evaluate("window.__opens")) == (2, 1)
        finally:
            b.browser.close()


def test_a_tree_stream_survives_a_server_restart_and_shows_the_childs_approval(
        chromium: Path, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    env, port = serve_env(tmp_path), free_port()
    with sync_playwright() as p:
        b = Browser(p, chromium)
        try:
            with alpaca_serve(env, port=port) as base:
                root = httpx.post(f"{base}/v1/runs", json={
                    "agent": "orchestrator", "input": "Should we launch?"}).json()
                b.open(base, f"/v1/runs/{root['id']}/events?tree=true")

                def child_approval() -> dict[str, Any] | None:
                    return next((m for m in b.messages() if m["data"]["type"] == "audit" and
                                 m["data"]["record"]["kind"] == "approval.requested"), None)

                requested = wait_for(child_approval, "the child's approval request")
                assert requested["data"]["run_id"].startswith(root["id"] + ".")
                seen_before = len(b.messages())
                last_id = b.messages()[-1]["id"]
            # The server is gone (SIGTERM); a new one on the same port and database.
            with alpaca_serve(env, port=port) as base:
                [approval] = httpx.get(f"{base}/v1/approvals").json()["items"]
                assert approval["run_id"] == requested["data"]["run_id"]
                r = httpx.post(f"{base}/v1/approvals/{approval['id']}/decision",
                               json={"decision": "approve"})
                assert r.status_code == 200
                wait_for(lambda: b.state() == CLOSED, "the EventSource to stop", 120)
                tree = httpx.get(f"{base}/v1/runs", params={"root_id": root["id"]}).json()
                audits = {r["id"]: httpx.get(f"{base}/v1/runs/{r['id']}/audit").json()["items"]
                          for r in tree["items"]}
                messages, requests = b.messages(), b.requests
        finally:
            b.browser.close()

    *events, end = messages
    assert len(events) > seen_before  # the rest arrived over the new connection
    # The orchestrator and the decision stream: the deltas that were live while a connection
    # was open come along (no record, no id of their own) between the durable audit records.
    records = [m for m in events if m["data"]["type"] == "audit"]
    deltas = [m for m in events if m["data"]["type"] == "message.delta"]
    assert all("record" not in m["data"] for m in deltas)
    assert len(records) + len(deltas) == len(events)
    for run_id, audit in audits.items():  # every record of every run, once, in order
        assert [m["data"]["record"] for m in records if m["data"]["run_id"] == run_id] == audit
    assert end["data"]["type"] == "end" and end["data"]["state"] == "succeeded"
    assert parse_cursor(root["id"], records[-1]["id"]) == {
        run_id: len(audit) for run_id, audit in audits.items()}
    # First stream, the reconnect after the restart resuming from the last id it had seen,
    # then the 204 after the end; attempts while no server listened got no response at all.
    assert b.statuses == [200, 200, 204]
    assert requests[0] is None and last_id in requests[1:-1]
    assert requests[-1] == records[-1]["id"]

"""The web page: served by the app without a build step, and usable in a real browser.

The browser test drives Debian's headless Chromium with Playwright (no browser download):
against a real ``alpaca serve`` of the bundled demo with an API key, it pastes the key, starts
an orchestrator run from the "New run" form, approves the Slack post in the approvals inbox
and watches the run reach ``succeeded`` with its five-run delegation tree and a verified
audit chain.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from alpaca_engine.api import create_app
from alpaca_engine.api.auth import create_api_key
from alpaca_engine.config import Settings
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.ui import ASSETS, STATIC
from tests.conftest import service_unavailable
from tests.helpers import PATIENCE, alpaca_serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


# ------------------------------------------------------------------ serving (in-process)


async def test_assets_load_without_a_key_and_stay_out_of_the_api_document(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/ui.db"
    store = SQLiteStore(url)
    await store.open()
    try:
        await create_api_key(store, "acme", "user", name="ann")  # authentication is on
        app = create_app(Settings(database_url=url), store=store, embedded_worker=False,
                         workflows=["builtin:quickstart"])
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://ui.test") as c:
            for path in ("/", "/ui"):
                r = await c.get(path)
                assert (r.status_code, r.headers["location"]) == (307, "/ui/")
            page = await c.get("/ui/")
            assert page.status_code == 200
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert '<script type="module" src="js/main.js">' in page.text
            types = {"html": "text/html", "css": "text/css", "js": "text/javascript",
                     "svg": "image/svg+xml"}
            assert {"index.html", "app.css", "js/main.js", "js/api.js"} <= set(ASSETS)
            for name in ASSETS:
                r = await c.get(f"/ui/{name}")
                assert r.status_code == 200, name
                assert r.headers["content-type"].startswith(types[name.rsplit(".", 1)[1]])
                assert r.headers["x-content-type-options"] == "nosniff"
            for missing in ("/ui/nope.js", "/ui/js/", "/ui/%2e%2e/__init__.py",
                            "/ui/..%2F__init__.py", "/ui/js/../../__init__.py"):
                r = await c.get(missing)
                assert r.status_code == 404, missing
                assert r.headers["content-type"] == "application/problem+json"
            assert (await c.get("/v1/runs")).status_code == 401  # the data still needs a key
            paths = app.openapi()["paths"]
            assert "/" not in paths and not any(p.startswith("/ui") for p in paths)
    finally:
        await store.close()


def test_the_page_fetches_nothing_from_elsewhere_and_never_parses_html() -> None:
    for name, entry in ASSETS.items():
        text = entry.read_text(encoding="utf-8")
        # the SVG namespace is a name, not a fetch (an xmlns attribute, or graph.js's constant)
        code = text.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
            'const SVG = "http://www.w3.org/2000/svg";', "")
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", code, re.I), \
            f"{name} refers to another site"
        if name.endswith(".js"):
            for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                          "eval(", "new Function"):
                assert risky not in text, f"{name} uses {risky}"
    assert STATIC.joinpath("index.html").is_file()


# -------------------------------------------------------------------- a real browser


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        service_unavailable("Chromium", f"{CHROMIUM} is missing (apt-get install chromium)")
    return CHROMIUM


@dataclass
class Watched:
    """A browser page and what it did wrong (page errors, console errors) and fetched."""

    page: Any
    problems: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


@contextmanager
def watched_page(playwright: Any, chromium: Path, width: int = 1280, height: int = 900,
                 expected: str = r"\b401\b") -> Iterator[Watched]:
    """A page of a fresh headless Chromium that waits as long as PATIENCE for anything;
    console errors matching ``expected`` (answers the test provokes) are not problems."""
    from playwright.sync_api import expect

    browser = playwright.chromium.launch(executable_path=str(chromium), headless=True,
                                         args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(PATIENCE * 1000)
        expect.set_options(timeout=PATIENCE * 1000)  # the page waits; speed is not tested
        seen = Watched(page)
        page.on("pageerror", lambda e: seen.problems.append(f"page error: {e}"))
        page.on("console", lambda m: seen.problems.append(f"console: {m.text}")
                if m.type == "error" and not re.search(expected, m.text) else None)
        page.on("request", lambda r: seen.urls.append(r.url))
        yield seen
    finally:
        browser.close()


def use_key(page: Any, key: str) -> None:
    """Paste ``key`` into the page's API key prompt (the first data call asks for it)."""
    from playwright.sync_api import expect

    panel = page.locator("#auth-panel")
    expect(panel).to_be_visible()
    panel.get_by_label("API key").fill(key)
    panel.get_by_role("button", name="Use key").click()
    expect(panel).to_be_hidden()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``alpaca serve`` of the bundled demo with one supervisor key: (base URL, key)."""
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/ui.db",
           "ALPACA_POLL_INTERVAL": "0.05"}
    made = subprocess.run(
        [sys.executable, "-m", "alpaca_engine", "keys", "create", "--tenant", "acme",
         "--role", "supervisor", "--name", "sue", "--json"],
        env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    with alpaca_serve(env) as base:
        yield base, key


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_approve_in_the_inbox_and_watch_the_run_finish(
        chromium: Path, served: tuple[str, str], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, key = served
    with sync_playwright() as p, watched_page(p, chromium) as seen:
        page, problems, urls = seen.page, seen.problems, seen.urls
        # The page itself loads without a key; its first data call asks for one.
        page.goto(base + "/")
        assert page.url.startswith(f"{base}/ui/")
        use_key(page, key)
        expect(page.locator("#auth-status")).to_contain_text("API key set")

        form = page.locator("#new-run")
        form.get_by_label("Agent").select_option(label="orchestrator")
        form.get_by_label("Input").fill("Should we launch in the EU this quarter?")
        form.get_by_role("button", name="Start run").click()
        page.wait_for_url(re.compile(r"#/runs/run_[0-9a-f]+$"))
        run_id = page.url.rsplit("/", 1)[1]
        expect(page.locator("#live-status")).to_have_text("● live")

        page.locator("a[data-nav=approvals]").click()
        card = page.locator("#inbox article.approval").filter(has_text="notify_slack")
        expect(card).to_be_visible()
        expect(card.locator("pre.json")).to_contain_text('"channel": "#eu-launch"')
        expect(card).to_contain_text("agent:notification")
        card.get_by_label("Comment (optional)").fill("ship it")
        card.get_by_role("button", name="Approve").click()
        expect(card).to_contain_text("Approved by sue")
        page.screenshot(path=str(tmp_path / "inbox.png"), full_page=True)

        card.get_by_role("link", name=run_id, exact=True).click()
        expect(page.locator("#run-state")).to_have_text("succeeded")
        expect(page.locator("#live-status")).to_have_text("run ended")
        nodes = page.locator("#tree .tree-node")
        expect(nodes).to_have_count(5)
        expect(nodes.locator(".badge")).to_have_text(["succeeded"] * 5)
        expect(page.locator("#audit-badge")).to_contain_text("verified")
        expect(page.locator("#run-output")).to_contain_text("Posted to #eu-launch")
        delegations = page.locator("#timeline li.kind-delegation")
        expect(delegations).to_have_count(4)
        expect(delegations.last).to_contain_text("delegation.finished")
        page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

        # The notification run shows the approval decision under its Slack step.
        nodes.filter(has_text="notification").get_by_role("link").click()
        step = page.locator("#timeline li.kind-tool").filter(has_text="notify_slack")
        expect(step.locator(".decision")).to_contain_text(
            ["gate.permission_allowed", "approval.requested", "approval.decided"])
        expect(step.locator(".decision").nth(2)).to_contain_text("approved: “ship it”")
        expect(step.locator(".decision").nth(2)).to_contain_text("user:sue")

        page.locator("a[data-nav=approvals]").click()
        page.get_by_role("link", name="Decided").click()
        decided = page.locator("#approvals-body tbody tr").filter(has_text="notify_slack")
        expect(decided).to_have_count(1)
        expect(decided.locator(".badge")).to_have_text("approved")
        expect(decided).to_contain_text("ship it")
    assert not problems, problems
    assert not [u for u in urls if key in u], "the API key leaked into a URL"
    assert all(u.startswith(base) for u in urls), "the page fetched from another origin"

"""The Workflows view and the run overlay in headless Chromium, against a real `alpaca serve`.

A builder pushes the demo's workflow under its own name (two versions); the page lists it
beside the served ones, draws its graph (six agents with the chat assistant, four tools, four
delegations, the approval gate on the Slack post) and switches versions; then a run of it
shows live on the graph: the notification agent waiting for the approval, and every agent
succeeded after it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from alpaca_engine.examples_builtin import __file__ as builtin_init
from tests.e2e.test_web_ui import chromium, use_key, watched_page  # noqa: F401 (fixture)
from tests.helpers import PATIENCE, alpaca_serve

DEMO = (Path(builtin_init).parent / "demo.yaml").read_text()
PUSHED = DEMO.replace("version: 1\n", "version: 1\nname: builder-demo\n", 1)


def make_key(env: dict[str, str], role: str, name: str) -> str:
    made = subprocess.run(
        [sys.executable, "-m", "alpaca_engine", "keys", "create", "--tenant", "acme",
         "--role", role, "--name", name, "--json"],
        env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["key"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """`alpaca serve` of the bundled demo: (base URL, builder key, supervisor key)."""
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/ui.db",
           "ALPACA_POLL_INTERVAL": "0.05"}
    builder = make_key(env, "builder", "ann")
    supervisor = make_key(env, "supervisor", "sue")
    with alpaca_serve(env) as base:
        yield base, builder, supervisor


def wait_for(check, seconds: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_push_draw_and_watch_a_run_on_the_graph(
        chromium: Path, served: tuple[str, str, str], tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    base, builder, supervisor = served
    ann = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {builder}"},
                       timeout=PATIENCE)
    sue = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {supervisor}"},
                       timeout=PATIENCE)
    yaml = {"Content-Type": "application/yaml"}
    v1 = ann.post("/v1/workflows", content=PUSHED, headers=yaml)
    assert v1.status_code == 201, v1.text
    v2 = ann.post("/v1/workflows", headers=yaml, content=PUSHED.replace(
        "Plans the work and delegates every step.", "Plans, delegates, summarises."))
    assert v2.status_code == 201 and v2.json()["version"] == 2

    with sync_playwright() as p, watched_page(p, chromium, 1400, 1000) as seen:
        page, problems = seen.page, seen.problems
        page.goto(base + "/ui/")
        use_key(page, supervisor)

        # the list: the registered workflow, then the served read-only one
        page.locator("a[data-nav=workflows]").click()
        rows = page.locator("#workflows-table tbody tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text("builder-demo")
        expect(rows.nth(0)).to_contain_text("registered")
        expect(rows.nth(1)).to_contain_text("builtin:demo")
        expect(rows.nth(1)).to_contain_text("read-only")

        # the graph of the latest version, drawn left to right from the orchestrator
        rows.nth(0).get_by_role("link", name="builder-demo").click()
        graph = page.locator("#workflow-graph svg.graph")
        expect(graph).to_be_visible()
        expect(page.locator("#workflow-ref")).to_have_text("registry:builder-demo@2")
        expect(graph.locator("g.node.kind-agent")).to_have_count(6)
        expect(graph.locator("g.node.kind-tool")).to_have_count(4)
        expect(graph.locator("path.edge.kind-delegates_to")).to_have_count(4)
        expect(graph.locator("path.edge.kind-uses")).to_have_count(5)
        expect(graph.locator("path.edge.gated")).to_have_count(1)
        expect(graph.locator("g.gate text")).to_have_text("approval")
        boxes = {node_id: graph.locator(f'g.node[data-id="{node_id}"]').bounding_box()
                 for node_id in ("agent:orchestrator", "agent:notification",
                                 "tool:notify_slack")}
        xs = [boxes[k]["x"] for k in ("agent:orchestrator", "agent:notification",  # type: ignore[index]
                                      "tool:notify_slack")]
        assert xs == sorted(xs) and len(set(xs)) == 3, boxes  # left to right
        graph.locator('g.node[data-id="tool:notify_slack"]').click()
        expect(page.locator("#node-details")).to_contain_text('"approval": "required"')
        expect(page.locator("#node-details")).to_contain_text("notify:slack")
        page.screenshot(path=str(tmp_path / "workflow.png"), full_page=True)

        # another version, then the served demo: its graph is drawable too
        page.locator("#version-select").select_option("1")
        expect(page.locator("#workflow-ref")).to_have_text("registry:builder-demo@1")
        expect(page.locator("#workflow-graph g.node.kind-agent")).to_have_count(6)
        page.goto(base + "/ui/#/workflows/builtin%3Ademo")
        expect(page.locator("#workflow-ref")).to_have_text("builtin:demo")
        expect(page.locator("#workflow-graph g.node")).to_have_count(10)

        # a run of the latest version started from its page, live on its graph
        page.goto(base + "/ui/#/workflows/builder-demo")
        start = page.locator("#start-run")
        expect(start).to_contain_text("builder-demo@2")
        start.get_by_label("Agent").select_option("orchestrator")
        start.get_by_label("Input").fill("Should we launch in the EU?")
        start.get_by_role("button", name="Start run").click()
        page.wait_for_url(re.compile(r"#/runs/run_[0-9a-f]+$"))
        run = sue.get(f"/v1/runs/{page.url.rsplit('/', 1)[1]}").json()
        assert run["workflow"] == "registry:builder-demo@2"
        overlay = page.locator("#run-graph svg.graph")
        expect(overlay.locator("g.node.kind-agent")).to_have_count(6)
        notification = overlay.locator('g.node[data-id="agent:notification"]')
        expect(notification).to_have_attribute("data-state", "waiting", timeout=60_000)
        search = overlay.locator('g.node[data-id="agent:search"]')
        expect(search).to_have_attribute("data-state", "succeeded")
        expect(search.locator("text.overlay")).to_contain_text("succeeded ·")
        expect(search.locator("text.overlay")).to_contain_text("steps")
        expect(overlay.locator('g.node[data-id="agent:orchestrator"]')).to_have_attribute(
            "data-state", "waiting")
        page.screenshot(path=str(tmp_path / "run-waiting.png"), full_page=True)

        approval = wait_for(lambda: [a for a in sue.get("/v1/approvals").json()["items"]
                                     if a["root_id"] == run["id"]])[0]
        decided = sue.post(f"/v1/approvals/{approval['id']}/decision",
                           json={"decision": "approve"})
        assert decided.status_code == 200
        for agent in ("orchestrator", "search", "research", "decision", "notification"):
            expect(overlay.locator(f'g.node[data-id="agent:{agent}"]')).to_have_attribute(
                "data-state", "succeeded", timeout=60_000)
        slack = overlay.locator('g.node[data-id="tool:notify_slack"]')
        expect(slack).to_have_attribute("data-state", "completed")
        expect(slack.locator("text.overlay")).to_have_text("1 call · last completed")
        expect(page.locator("#run-state")).to_have_text("succeeded")
        page.screenshot(path=str(tmp_path / "run-done.png"), full_page=True)
    assert not problems, problems

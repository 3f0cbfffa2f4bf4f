"""The Chat view in headless Chromium, against a real ``alpaca serve``.

A user starts a conversation with a streaming assistant and watches the answer arrive in
pieces before its turn ends; the assistant remembers the user's name on the next turn; a
reload of the page's address shows the same conversation; a fork from turn 1 is a new
thread with that one turn; a conversation with an agent that delegates a gated
announcement shows the approval inline, and approving it there finishes the turn.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import WORKFLOW_YAML, workflow_folder
from tests.e2e.test_web_ui import chromium, use_key, watched_page  # noqa: F401 (fixture)
from tests.e2e.test_workflows_ui import make_key
from tests.helpers import PATIENCE, alpaca_serve

# The API tests' gated announcer (approval required), the bundled assistant streamed slowly
# enough (3 characters every 0.1 s) that a browser sees the answer grow, and a lead that
# delegates the announcement (its approval belongs to a child run of the turn).
WORKFLOW = WORKFLOW_YAML + """
  - name: assistant
    description: A chat assistant that remembers the conversation.
    instructions: Answer the user; remember what they told you earlier in the thread.
    model: {provider: function, stream: true, chunk_size: 3, delay: 0.1,
            function: "alpaca_engine.examples_builtin.builder_models:assistant"}
    history: {max_turns: 50}
  - name: lead
    description: Hands the announcement to the announcer.
    model:
      provider: scripted
      script:
        - {tool: delegate_to_announcer, args: {task: "announce the launch"}}
        - "The team knows: launch at noon."
    delegates_to: [announcer]
"""

# Records, in the page, every text the pending answer shows and the turn's state then.
WATCH = """() => {
  window.__seen = [];
  const record = () => {
    for (const turn of document.querySelectorAll("#messages li.turn")) {
      const answer = turn.querySelector(".msg.assistant .answer");
      const last = window.__seen.filter((s) => s.turn === turn.dataset.turn).pop();
      const entry = { turn: turn.dataset.turn, state: turn.dataset.state,
                      text: answer ? answer.textContent : "" };
      if (!last || last.text !== entry.text || last.state !== entry.state) {
        window.__seen.push(entry);
      }
    }
  };
  new MutationObserver(record).observe(document.getElementById("view"),
    { subtree: true, childList: true, characterData: true, attributes: true,
      attributeFilter: ["data-state"] });
}"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``alpaca serve`` of the chat workflow with one supervisor key: (base URL, key)."""
    workflow = workflow_folder(tmp_path / "chatwf", WORKFLOW)
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/chat.db",
           "ALPACA_POLL_INTERVAL": "0.05"}
    key = make_key(env, "supervisor", "sue")
    with alpaca_serve(env, "--workflow", str(workflow)) as base:
        yield base, key


def streamed_before_end(seen: list[dict[str, Any]], turn: str, final: str) -> list[str]:
    """The partial answers turn ``turn`` showed while it was not finished yet."""
    partial = []
    for entry in seen:
        if entry["turn"] != turn:
            continue
        if entry["state"] == "succeeded":
            break
        text = entry["text"]
        if text and text != final and final.startswith(text):
            partial.append(text)
    return partial


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_chat_streams_remembers_reloads_forks_and_approves_inline(
        chromium: Path, served: tuple[str, str], tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    base, key = served
    sue = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                       timeout=PATIENCE)
    provoked = r"\b(401|404|422)\b"  # before the key, a deleted thread, a blank message
    with sync_playwright() as p, watched_page(p, chromium, expected=provoked) as seen:
        page, problems, urls = seen.page, seen.problems, seen.urls
        page.on("dialog", lambda d: d.accept())  # the delete confirmation
        page.goto(base + "/ui/#/chat")
        use_key(page, key)

        # A new conversation: the chat agent is preselected.
        form = page.locator("#new-thread")
        expect(form.get_by_label("Agent").locator("option:checked")).to_have_text(
            "assistant")
        form.get_by_label("Title").fill("About <me> & Ada")
        form.get_by_role("button", name="Start conversation").click()
        page.wait_for_url(re.compile(r"#/chat/thr_[0-9a-z_]+$"))
        thread_id = page.url.rsplit("/", 1)[1]
        expect(page.locator("#thread-name")).to_have_text("About <me> & Ada")  # as text
        expect(page.locator("#thread-list a[aria-current=page]")).to_contain_text(
            "About <me> & Ada")
        expect(page.locator("#chat-live")).to_have_text("● live")
        page.evaluate(WATCH)

        # Turn 1 streams in: partial answers show before the turn's end.
        box = page.get_by_label("Message")
        box.fill("My name is Ada.")
        box.press("Enter")
        first = page.locator("#turn-1")
        noted = "Noted: your name is Ada. I will remember it for this conversation."
        expect(first.locator(".msg.user")).to_contain_text("My name is Ada.")
        expect(first).to_have_attribute("data-state", "succeeded")
        expect(first.locator(".msg.assistant .answer")).to_have_text(noted)
        seen = page.evaluate("window.__seen")
        partial = streamed_before_end(seen, "1", noted)
        assert partial, f"no partial answer was shown before the end: {seen}"
        assert int(first.get_attribute("data-deltas") or 0) > 1
        expect(page.locator("#composer button[type=submit]")).to_be_enabled()

        # A blank message: the server's 422 as one readable line.
        box.fill("   ")
        page.locator("#composer").get_by_role("button", name="Send").click()
        expect(page.locator("#composer-error")).to_have_text(
            re.compile(r"^content: the message is empty"))

        # Turn 2 remembers; Shift+Enter is a new line, not a send.
        box.fill("Hello again.")
        box.press("Shift+Enter")
        box.type("What is my name?")
        expect(box).to_have_value("Hello again.\nWhat is my name?")
        expect(page.locator("#turn-2")).to_have_count(0)
        box.press("Enter")
        second = page.locator("#turn-2")
        expect(second).to_have_attribute("data-state", "succeeded")
        expect(second.locator(".msg.assistant .answer")).to_have_text("Your name is Ada.")
        expect(page.locator("#composer-error")).to_have_text("")
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

        # A reload of the address shows the same conversation with its history.
        page.reload()
        expect(page.locator("#thread-name")).to_have_text("About <me> & Ada")
        turns = page.locator("#messages li.turn")
        expect(turns).to_have_count(2)
        expect(turns.locator(".msg.user .text")).to_have_text(
            ["My name is Ada.", "Hello again.\nWhat is my name?"])
        expect(turns.locator(".msg.assistant .answer")).to_have_text(
            [noted, "Your name is Ada."])
        expect(turns.locator(".turn-state")).to_have_text(["succeeded", "succeeded"])

        # Fork from turn 1: a new thread holding that turn only, which answers on.
        first.get_by_role("button", name="Fork from turn 1").click()
        page.wait_for_url(lambda url: re.search(r"#/chat/thr_[0-9a-z_]+$", url) is not None
                          and not url.endswith(thread_id))
        fork_id = page.url.rsplit("/", 1)[1]
        expect(page.locator(".conversation-head")).to_contain_text(
            f"forked from {thread_id} at turn 1")
        expect(turns).to_have_count(1)
        expect(turns.locator(".msg.assistant .answer")).to_have_text(noted)
        box.fill("What is my name?")
        box.press("Enter")
        expect(page.locator("#turn-2 .msg.assistant .answer")).to_have_text(
            "Your name is Ada.")

        # Delete the fork (confirmed): it leaves the list; the original stays.
        page.get_by_role("button", name="Delete conversation").click()
        page.wait_for_url(re.compile(r"#/chat$"))
        expect(page.locator(f"#thread-list a[data-thread-id='{thread_id}']")).to_have_count(1)
        expect(page.locator(f"#thread-list a[data-thread-id='{fork_id}']")).to_have_count(0)
        assert sue.get(f"/v1/threads/{fork_id}").status_code == 404

        # A delegated announcement waits for an approval shown in the turn; approve it.
        form.get_by_label("Agent").select_option(label="lead")
        form.get_by_label("Title").fill("")
        form.get_by_role("button", name="Start conversation").click()
        expect(page.locator("#thread-name")).to_have_text("lead conversation")
        expect(page.locator("#chat-live")).to_have_text("● live")
        box.fill("Tell everyone about the launch.")
        box.press("Enter")
        turn = page.locator("#turn-1")
        card = turn.locator("article.approval").filter(has_text="announce")
        expect(card).to_be_visible()
        expect(card.locator("pre.json")).to_contain_text('"message": "launch at noon"')
        expect(page.locator("#composer button[type=submit]")).to_be_disabled()
        box.fill("And tell me when it is done.")
        box.press("Enter")  # typed ahead: kept, and not sent while the turn waits
        expect(page.locator("#composer-error")).to_have_text(re.compile(
            r"^Turn 1 is still (waiting|running|queued); send this once it has finished\.$"))
        expect(box).to_have_value("And tell me when it is done.")
        card.get_by_label("Comment (optional)").fill("go ahead")
        card.get_by_role("button", name="Approve").click()
        expect(card).to_contain_text("Approved by sue")
        expect(turn).to_have_attribute("data-state", "succeeded")
        expect(turn.locator(".msg.assistant .answer")).to_have_text(
            "The team knows: launch at noon.")
        steps = turn.locator("details.tool-steps")
        expect(steps.locator("summary")).to_contain_text("1 tool step: delegate_to_announcer")
        steps.locator("summary").click()
        expect(steps.locator("li.tool-step")).to_contain_text("announce the launch")
        expect(steps.locator("li.tool-step")).to_contain_text("announced")
        expect(page.locator("#composer button[type=submit]")).to_be_enabled()
        page.screenshot(path=str(tmp_path / "approval.png"), full_page=True)

        # An address of no (or a deleted) conversation says so.
        page.goto(f"{base}/ui/#/chat/{fork_id}")
        expect(page.locator("#chat-main")).to_contain_text("No such conversation")
    assert not problems, problems
    assert not [u for u in urls if key in u], "the API key leaked into a URL"
    assert all(u.startswith(base) for u in urls), "the page fetched from another origin"

"""The offline "models" of the builder demo: deterministic functions that plan the next tool
call from what the conversation already holds, so every answer is derived from real tool
results (search hits, fetched pages, the Slack delivery) rather than canned text."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from typing import Any

from alpaca_engine.models.base import Message, ToolSpec

Results = list[tuple[str, Any]]


def _task(messages: Sequence[Message]) -> str:
    return next(m.content or "" for m in messages if m.role == "user")


def _results(messages: Sequence[Message]) -> Results:
    return [(m.name or "", json.loads(m.content or "null")) for m in messages if m.role == "tool"]


def _failure(value: Any) -> str:
    """A tool's error result as a sentence (``{"error": {code, message}}`` is what it gets)."""
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return f"{error['message']} ({error.get('code', 'error')})"
    return json.dumps(value, default=str)


def _child_output(results: Results, agent: str) -> Any:
    """What a sub-agent answered: its text, or the JSON value of a typed agent (decision)."""
    for name, value in results:
        if name == f"delegate_to_{agent}":
            if isinstance(value, dict) and "output" in value:
                return value["output"]
            return f"(failed: {_failure(value)})"
    return None


def decision_sentence(decision: Any) -> str:
    """The decision agent's ``{decision, confidence, reasons}`` as one line for people."""
    if not isinstance(decision, dict):
        return str(decision)
    reasons = "; ".join(str(r) for r in decision.get("reasons", []))
    return (f"Decision: {decision.get('decision')} for the EU launch this quarter "
            f"(confidence {float(decision.get('confidence', 0)):.0%}: {reasons}).")


def orchestrator(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """Search → research → decision → notification, each a delegation, then a summary."""
    question = _task(messages)
    got = _results(messages)
    found = _child_output(got, "search")
    if found is None:
        return {"tool": "delegate_to_search",
                "args": {"task": f"Find internal documents for: {question}"}}
    facts = _child_output(got, "research")
    if facts is None:
        return {"tool": "delegate_to_research",
                "args": {"task": f"Read these pages and list the key facts:\n{found}"}}
    decision = _child_output(got, "decision")
    if decision is None:
        return {"tool": "delegate_to_decision",
                "args": {"task": f"Question: {question}\nFacts:\n{facts}"}}
    posted = _child_output(got, "notification")
    if posted is None:  # the notification agent gets the typed decision itself, as JSON
        return {"tool": "delegate_to_notification",
                "args": {"task": f"Tell #eu-launch: {json.dumps(decision)}"}}
    return f"{decision_sentence(decision)}\n{posted}"


def search(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    got = _results(messages)
    if not got:
        query = _task(messages).split(":", 1)[-1].strip()
        return {"tool": "web_search", "args": {"query": query, "limit": 3}}
    hits = got[-1][1].get("hits", []) if isinstance(got[-1][1], dict) else []
    return "\n".join(f"- {h['title']}: {h['url']}" for h in hits) or "nothing found"


def research(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    got = _results(messages)
    if not got:
        urls = re.findall(r"https?://\S+", _task(messages))
        if not urls:
            return "- no pages to read: the search found nothing"
        # several tool calls in one turn: the engine runs them one at a time, in this order
        return {"calls": [{"tool": "fetch_page", "args": {"url": u, "max_chars": 2000}}
                          for u in urls]}
    facts = []
    for _name, page in got:
        if isinstance(page, dict) and page.get("text"):
            first = " ".join(page["text"].split())
            facts.append(f"- {page.get('title')}: {first[:300]}")
        else:
            facts.append(f"- could not read a page: {page}")
    return "\n".join(facts)


POSITIVE = ("ready", "signed", "strong", "staffed", "passed")
NEGATIVE = ("blocker", "not ready", "missing", "failed", "unstaffed")


def decision(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """A typed answer: the JSON ``{decision, confidence, reasons}`` its output schema asks."""
    text = _task(messages).lower()
    found = [w for w in POSITIVE if w in text]
    plus = sum(text.count(w) for w in POSITIVE)
    minus = max(sum(text.count(w) for w in NEGATIVE) - text.count("not a blocker"), 0)
    verdict = "GO" if plus > 2 * minus else "NO-GO"
    reasons = [f"{plus} readiness signals in the research ({', '.join(found) or 'none'})",
               f"{minus} blockers"]
    confidence = round(max(plus, minus) / (plus + minus + 2), 2)  # 2: some doubt left
    return json.dumps({"decision": verdict, "confidence": confidence, "reasons": reasons})


def notification(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """Posts the decision: the typed value the orchestrator passed on, as a sentence."""
    got = _results(messages)
    if not got:
        text = _task(messages).split(":", 1)[-1].strip()
        with contextlib.suppress(ValueError):  # a plain-text task is posted as it is
            text = decision_sentence(json.loads(text))
        return {"tool": "notify_slack", "args": {"text": text, "channel": "#eu-launch"}}
    delivery = got[-1][1]
    if isinstance(delivery, dict) and delivery.get("ok"):
        return f"Posted to {delivery.get('channel')} (HTTP {delivery.get('status')})."
    return f"Not posted: {_failure(delivery)}."


_FACT = re.compile(r"\bmy (\w+(?: \w+)?) is ([^.!?\n]+)", re.IGNORECASE)
_QUESTION = re.compile(r"\bwhat(?: is|'s) my (\w+(?: \w+)?)\??", re.IGNORECASE)
_LOOKUP = re.compile(r"^(?:search|find|look up)\b:?\s*(.+)$", re.IGNORECASE)


def assistant(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
    """A chat assistant that remembers: facts the user told it in earlier turns ("my name is
    Ada") come back from the history the engine rebuilt from the journal, never from a
    variable here; "search …" looks in the local documents (a tool step in the chat)."""
    users = [m.content or "" for m in messages if m.role == "user"]
    latest = users[-1] if users else ""
    if messages and messages[-1].role == "tool":
        found = json.loads(messages[-1].content or "[]")  # search_documents: a list of hits
        hits = found if isinstance(found, list) else found.get("hits", [])
        listed = "\n".join(f"- {h['title']}: {h['url']}" for h in hits[:3])
        return f"Here is what I found:\n{listed}" if listed else "I found nothing on that."
    lookup = _LOOKUP.match(latest.strip())
    if lookup and any(t.name == "search_documents" for t in tools):
        return {"tool": "search_documents", "args": {"query": lookup.group(1), "limit": 3}}
    asked = _QUESTION.search(latest)
    if asked:
        key = asked.group(1).lower()
        for earlier in reversed(users[:-1]):
            for fact in _FACT.finditer(earlier):
                if fact.group(1).lower() == key:
                    return f"Your {key} is {fact.group(2).strip()}."
        return f"You have not told me your {key} yet."
    told = [f"{f.group(1).lower()} is {f.group(2).strip()}" for f in _FACT.finditer(latest)]
    if told:
        return f"Noted: your {', '.join(told)}. I will remember it for this conversation."
    return (f"You said: {latest.strip()!r}. Tell me something about you (\"my name is …\"), "
            "ask me about it later, or ask me to \"search …\" the documents.")

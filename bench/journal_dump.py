"""Dump the journal, audit and progress events of a fixed set of scripted runs.

A check for changes that must not change what a run records: run it on two checkouts and
diff the outputs. Ids come from a seeded generator and time from a FakeClock, so the audit
chains (hashes included) are comparable byte for byte; only wall-clock durations and
tracebacks (file paths and line numbers) are replaced by placeholders, and a chain whose
data holds a traceback differs in its hashes from there on.

Run::

    uv run python bench/journal_dump.py > /tmp/after.txt
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from alpaca_engine.agents import Agent, ApprovalPolicy
from alpaca_engine.clock import FakeClock
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import ModelError
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.breaker import BreakerPolicy
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.tools.retry import RetryPolicy, TransientError
from alpaca_engine.workflow import Workflow

VOLATILE = {"ms", "traceback"}


@tool(capabilities=["math"])
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
async def echo(text: str) -> dict[str, Any]:
    """Echo the text back, nested."""
    return {"text": text, "n": [1, 2, {"k": text}]}


@tool(capabilities=["net"])
async def fetch(url: str) -> str:
    """Pretend to fetch a URL."""
    return f"<html>{url}</html>"


@tool
def boom(why: str) -> str:
    """Raise."""
    raise RuntimeError(f"exploded: {why} sk-abcdefghijklmnopqrstuvwxyz123456")


@tool(timeout=0.01)
async def slow(x: int) -> int:
    """Sleep past the timeout."""
    await asyncio.sleep(1)
    return x


@tool
def liar(x: int) -> int:
    """Breaks its output contract."""
    return "not an int"  # type: ignore[return-value]


@tool
def leaky(x: int) -> dict[str, Any]:
    """Returns a secret."""
    return {"api_key": "hunter2-long-secret", "token": "sk-zyxwvutsrqponmlkjihgfedcba98765",
            "x": x, "text": "Bearer abc.def.ghi"}


@tool
def setty(x: int) -> Any:
    """Returns something JSON cannot hold as given."""
    return {"s": {x}}


FLAKY = {"n": 0}


@tool(retry=RetryPolicy(max_attempts=3, initial_delay=0.1, jitter=0.0))
def flaky(x: int) -> int:
    """Transient failures, then success."""
    FLAKY["n"] += 1
    if FLAKY["n"] % 3:
        raise TransientError("try again")
    return x


@tool(breaker=BreakerPolicy(failure_threshold=2, reset_timeout=60))
def broken(x: int) -> int:
    """Always fails (opens its breaker)."""
    raise ValueError("no")


@tool(capabilities=["notify"], approval="required")
def notify(text: str, ctx: ToolContext) -> str:
    """Send a message (gated)."""
    return f"sent {text} with {ctx.idempotency_key[-2:]}"


@tool(name="pay")
def _pay(amount: int) -> str:
    return f"paid {amount}"


pay = replace(_pay, cost=2.5)

TOOLS = [add, fetch, echo, boom, slow, liar, leaky, setty, flaky, broken, notify, pay]


def agent(name: str, script: list[Any], **kw: Any) -> Agent:
    kw.setdefault("tools", ["*"])
    return Agent(name=name, model=ScriptedModel(script, stream=kw.pop("stream", False)),
                 instructions=f"You are {name}.", **kw)


def wf(*agents: Agent, **kw: Any) -> Workflow:
    return Workflow(ref="dump", agents={a.name: a for a in agents}, tools=ToolRegistry(TOOLS),
                    **kw)


def calls(*items: tuple[str, Any]) -> dict[str, Any]:
    return {"calls": [{"tool": t, "args": a} for t, a in items], "text": "calling"}


def scenarios() -> list[tuple[str, Workflow, str, str]]:
    big = "x" * 300_000
    out: list[tuple[str, Workflow, str, str]] = []
    out.append(("loop", wf(agent("a", [
        *[{"tool": "add", "args": {"a": i, "b": 1}} for i in range(5)], "done"])), "a", "go"))
    out.append(("gate", wf(agent("a", [
        calls(("nope", {}), ("fetch", {"url": "x"}), ("add", {"a": 1, "b": 2}),
              ("add", '{"a": 1, "b": '),
              ("add", {"a": "one", "b": 2}), ("add", {"a": 1}), ("add", "[1, 2]"),
              ("add", "  "), ("echo", {"text": "\\u0073k-abcdefghijklmnopqrstuvwxyz1234"}),
              ("echo", '{"text": "\\ud800 lone"}'), ("echo", {"text": big}),
              ("echo", "[" * 70 + "]" * 70)),
        calls(("boom", {"why": "because"}), ("slow", {"x": 1}), ("liar", {"x": 1}),
              ("leaky", {"x": 2}), ("setty", {"x": 3}), ("flaky", {"x": 4}),
              ("echo", {"text": "Bearer secret-token-value"})),
        calls(("broken", {"x": 1}), ("broken", {"x": 2}), ("broken", {"x": 3})),
        "recovered"], tools=["add", "echo", "boom", "slow", "liar", "leaky", "setty",
                             "flaky", "broken", "nope"],
        capabilities=frozenset({"math"}))), "a", "go"))
    out.append(("caps", wf(agent("a", [calls(("add", {"a": 1, "b": 2}),
                                             ("fetch", {"url": "u"})), "ok"],
                                 capabilities=frozenset({"net"}))), "a", "go"))
    out.append(("approval", wf(agent("a", [calls(("notify", {"text": "hi"}),
                                                 ("pay", {"amount": 3})), "notified"],
                                     approval=ApprovalPolicy(cost_above=1.0))), "a", "go"))
    out.append(("reject", wf(agent("a", [calls(("notify", {"text": "no"})), "fine"])),
                "a", "go"))
    out.append(("delegate", wf(
        agent("boss", [{"tool": "delegate_to_worker", "args": {"task": "sum"}},
                       {"tool": "delegate_to_worker", "args": {"task": ""}},
                       {"tool": "delegate_to_nobody", "args": {"task": "x"}}, "boss done"],
              delegates_to=["worker"]),
        agent("worker", [{"tool": "add", "args": {"a": 2, "b": 2}}, "four"])), "boss", "go"))
    out.append(("typed", wf(agent("t", ['{"n": "x"}', '{"n": 3}'],
                                  output_schema={"type": "object", "properties": {
                                      "n": {"type": "integer"}}, "required": ["n"]})),
                "t", "go"))
    out.append(("typed_fail", wf(agent("t", ["nope", "still no"], output_retries=1,
                                       output_schema={"type": "integer"})), "t", "go"))
    out.append(("stream", wf(agent("s", [{"tool": "echo", "args": {"text": "sk-" + "q" * 30}},
                                         "streamed answer " * 5], stream=True)), "s", "go"))
    out.append(("max_steps", wf(agent("m", [{"tool": "add", "args": {"a": 1, "b": 1}}] * 5,
                                      max_steps=2)), "m", "go"))
    out.append(("model_error", wf(Agent(name="e", model=FunctionModel(_fails),
                                        instructions="x"), ), "e", "go"))
    out.append(("budget", wf(agent("b", [{"tool": "add", "args": {"a": 1, "b": 1}}] * 5 + ["d"],
                                   max_output_tokens=10), budget={"tokens": 200}), "b", "go"))
    out.append(("cost", wf(agent("c", [calls(("pay", {"amount": 1}), ("pay", {"amount": 2})),
                                       "paid"]), budget={"cost": 4.0}), "c", "go"))
    out.append(("usage_overrun", wf(agent("u", [{"text": "long", "calls": [], "usage": {
        "input_tokens": 10, "output_tokens": 5000}}, "x"], max_output_tokens=5)), "u", "go"))
    return out


def _fails(messages: Any, tools: Any) -> Any:
    raise ModelError("provider down sk-abcdefghijklmnopqrstuvwxyz999999", transient=False)


_RNG = random.Random(7)
uuid.uuid4 = lambda: uuid.UUID(int=_RNG.getrandbits(128), version=4)


def clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<v>" if k in VOLATILE else clean(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


async def dump_run(store: SQLiteStore, run_id: str, out: list[str]) -> None:
    run = await store.get_run(run_id)
    tree = await store.list_runs(root_id=run.root_id, limit=100)
    for r in sorted(tree, key=lambda r: (r.depth, r.id)):
        audit = [dataclasses.asdict(a) for a in await store.list_audit(r.id)]
        # A traceback names files and lines: the hashes from its record on are not compared.
        cut = next((i for i, a in enumerate(audit) if "traceback" in a["data"]), len(audit))
        for i, a in enumerate(audit):
            if i >= cut:
                a["hash"] = "<after traceback>"
            if i > cut:
                a["prev_hash"] = "<after traceback>"
        data = r.model_dump(mode="json")
        if cut < len(audit):
            data["audit_hash"] = "<after traceback>"
        out.append(json.dumps(clean(data), sort_keys=True))
        for s in await store.list_steps(r.id):
            out.append(json.dumps(clean(s.model_dump(mode="json")), sort_keys=True))
        out.extend(json.dumps(clean(a), sort_keys=True) for a in audit)


async def main() -> None:
    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, workflow, agent_name, text in scenarios():
            FLAKY["n"] = 0
            store = SQLiteStore(f"sqlite:///{Path(tmp) / name}.db")
            await store.open()
            events: list[dict[str, Any]] = []
            eng = Engine(store, lambda ref, w=workflow: w, clock=FakeClock(),
                         emit=events.append, owner="dump")
            run = await eng.run(workflow, agent_name, text)
            while pending := await store.list_approvals(status="pending"):
                await store.decide_approval(pending[0].id, approve=name != "reject",
                                            by="sue", comment="ok", now=1.0)
                run = await eng.run_tree(run.id)
            out.append(f"== {name}: {run.state}")
            await dump_run(store, run.id, out)
            for e in events:
                out.append("event " + (json.dumps(clean(e), sort_keys=True,
                                                             default=str)))
            await store.close()
        # a thread of three turns (history rebuilt from the journals)
        store = SQLiteStore(f"sqlite:///{Path(tmp) / 'thread'}.db")
        await store.open()
        workflow = wf(agent("c", [{"tool": "add", "args": {"a": 1, "b": 2}}, "three",
                                  "again", "third"]))
        eng = Engine(store, lambda ref: workflow, clock=FakeClock(), owner="dump")
        thread = await eng.create_thread(agent="c", workflow=workflow)
        for text in ("one", "two", "three"):
            run = await eng.chat(thread.id, text)
            out.append(f"== thread turn {text}: {run.state}")
            await dump_run(store, run.id, out)
        await store.close()
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    asyncio.run(main())

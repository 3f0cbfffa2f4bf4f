"""Every failure path of a run we can provoke, as scenarios any store can be driven through.

Each scenario builds a workflow, runs it on the given store (SQLite in tests/unit, the real
PostgreSQL in tests/integration) and returns the run as it ended. The invariant the tests
check on all of them: the run is terminal or waiting, and a terminal run has no step left
``started``; ``EXPECTED`` says which state and error code each one must end with.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from alpaca_engine.agents import Agent
from alpaca_engine.clock import FakeClock
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import Message, ModelError, ToolSpec
from alpaca_engine.models.function import FunctionModel
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.base import Store
from alpaca_engine.store.records import RunRecord
from alpaca_engine.tools.base import Tool
from alpaca_engine.tools.breaker import BreakerPolicy
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow

DEEP_ARRAY = "[" * 10_000 + "]" * 10_000
DEEP_OBJECT = '{"a":' * 10_000 + "1" + "}" * 10_000


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(capabilities=["net"])
def fetch(url: str) -> str:
    """Needs a capability the agent lacks."""
    return url


@tool
def echo(text: str) -> str:
    """Return the text."""
    return text


@tool
def boom() -> str:
    """Raise an ordinary exception."""
    raise RuntimeError("tool broke")


@tool
def exits() -> str:
    """Call sys.exit(3) like a careless script."""
    raise SystemExit(3)


@tool
async def interrupts() -> str:
    """Raise KeyboardInterrupt from async code (it would stop the event loop)."""
    raise KeyboardInterrupt


@tool
def generator_exit() -> str:
    """Raise GeneratorExit."""
    raise GeneratorExit


@tool(timeout=0.2)
async def slow() -> str:
    """Sleep past its timeout."""
    await asyncio.sleep(30)
    return "late"


@tool
def liar() -> int:
    """Break its own output contract."""
    return "not a number"  # type: ignore[return-value]


@tool
def surrogate_result() -> str:
    """Return text that UTF-8 cannot encode."""
    return "half a pair: \ud800!"


@tool
def surrogate_error() -> str:
    """Raise with text that UTF-8 cannot encode."""
    raise ValueError("bad byte \udcff here")


@tool
def deep_result() -> list[Any]:
    """Return a list nested 10,000 deep."""
    value: list[Any] = []
    for _ in range(10_000):
        value = [value]
    return value


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot render me")


def unprintable() -> Any:  # no return annotation: the runner gets the object itself
    """Return an object that cannot even be turned into text."""
    return _Unprintable()


unprintable_tool = tool(unprintable)

flaky_calls = {"n": 0}


@tool(breaker=BreakerPolicy(failure_threshold=1, reset_timeout=3600))
def flaky() -> str:
    """Fail, so that the breaker opens."""
    flaky_calls["n"] += 1
    raise RuntimeError("upstream down")


ALL_TOOLS: list[Tool] = [add, fetch, echo, boom, exits, interrupts, generator_exit, slow, liar,
                         surrogate_result, surrogate_error, deep_result, unprintable_tool, flaky]


@dataclass
class Ended:
    run: RunRecord
    tool_messages: list[dict[str, Any]]
    """What the model was told after each tool call."""


def _workflow(model: Any, *, tools: Sequence[Tool] = ALL_TOOLS, allow: Sequence[str] = ("*",),
              budget: dict[str, Any] | None = None, approval_tools: Sequence[str] = (),
              max_output_tokens: int = 1024) -> Workflow:
    from alpaca_engine.agents import ApprovalPolicy

    agent = Agent(name="agent", model=model, instructions="Be useful.", tools=list(allow),
                  max_output_tokens=max_output_tokens,
                  approval=ApprovalPolicy(tools=tuple(approval_tools)))
    return Workflow(ref="failure-paths", agents={"agent": agent}, tools=ToolRegistry(tools),
                    budget=budget or {})


def _told(model: ScriptedModel) -> list[dict[str, Any]]:
    if not model.calls:
        return []
    return [json.loads(m.content or "null") for m in model.calls[-1] if m.role == "tool"]


async def _scripted(store: Store, script: list[Any], **kw: Any) -> Ended:
    model = ScriptedModel(script)
    wf = _workflow(model, **kw)
    run = await Engine(store, lambda ref: wf).run(wf, "agent", "go")
    return Ended(run, _told(model))


def _call(name: str, args: Any = None) -> dict[str, Any]:
    return {"tool": name, "args": {} if args is None else args}


def tool_path(name: str, args: Any = None, **kw: Any) -> Callable[[Store], Awaitable[Ended]]:
    """The model calls ``name`` once, then answers: the run must go on after the failure."""
    return lambda store: _scripted(store, [_call(name, args), "recovered"], **kw)


def model_path(answer: Any) -> Callable[[Store], Awaitable[Ended]]:
    """The model's first turn is ``answer`` (a value or an exception to raise)."""

    async def run(store: Store) -> Ended:
        def decide(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Any:
            if isinstance(answer, BaseException):
                raise answer
            return answer

        wf = _workflow(FunctionModel(decide))
        return Ended(await Engine(store, lambda ref: wf).run(wf, "agent", "go"), [])

    return run


async def _paused_on_approval(store: Store) -> tuple[Engine, RunRecord]:
    """A gated call pauses the run with its step ``started``."""
    model = ScriptedModel([_call("echo", {"text": "x"}), "done"])
    wf = _workflow(model, approval_tools=["echo"])
    engine = Engine(store, lambda ref: wf)
    waiting = await engine.run(wf, "agent", "go")
    assert waiting.state == "waiting"
    return engine, waiting


async def cancel_while_waiting(store: Store) -> Ended:
    engine, waiting = await _paused_on_approval(store)
    await engine.cancel(waiting.id)
    return Ended(await store.get_run(waiting.id), [])


async def cancel_mid_run(store: Store) -> Ended:
    """A tool asks for its own run's cancellation; the runner stops at the next turn."""
    @tool(name="echo")
    async def cancel_me(text: str) -> str:
        for run in await store.list_runs(limit=10):
            if run.state == "running":
                await store.request_cancel(run.id)
        return text

    model = ScriptedModel([_call("echo", {"text": "x"}), "never reached"])
    wf = _workflow(model, tools=[cancel_me])
    return Ended(await Engine(store, lambda ref: wf).run(wf, "agent", "go"), [])


async def deadline_passes(store: Store) -> Ended:
    clock = FakeClock()

    @tool(name="echo")
    def take_long(text: str) -> str:
        clock.advance(3600)
        return text

    model = ScriptedModel([_call("echo", {"text": "x"}), "never reached"])
    wf = _workflow(model, tools=[take_long], budget={"deadline_seconds": 60})
    return Ended(await Engine(store, lambda ref: wf, clock=clock).run(wf, "agent", "go"), [])


async def approval_expires(store: Store) -> Ended:
    """Policy deny on expiry: the woken run fails; the gated step must not stay ``started``."""
    engine, waiting = await _paused_on_approval(store)
    await store.expire_approvals(time.time() + 2 * 24 * 3600)  # expired; the run requeued
    return Ended(await engine.run_tree(waiting.id), [])


class _FaultyApprovals:
    """The store, except that creating an approval fails: an exception after a step was
    journaled ``started`` and before its outcome could be written."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def create_approval(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError("approvals table unavailable")


async def store_fault_mid_step(store: Store) -> Ended:
    model = ScriptedModel([_call("echo", {"text": "x"}), "done"])
    wf = _workflow(model, approval_tools=["echo"])
    faulty: Any = _FaultyApprovals(store)
    return Ended(await Engine(faulty, lambda ref: wf).run(wf, "agent", "go"), [])


async def overspent_model(store: Store) -> Ended:
    """The provider reports far more tokens than the cap the reservation assumed."""
    big = {"text": None, "calls": [], "usage": {"input_tokens": 20, "output_tokens": 250}}
    return await _scripted(store, [big], budget={"max_tokens": 100}, max_output_tokens=50)


SCENARIOS: dict[str, tuple[Callable[[Store], Awaitable[Ended]], str, str | None]] = {
    # gate refusals: back to the model, the run goes on
    "unknown_tool": (tool_path("nope"), "succeeded", None),
    "permission_denied": (tool_path("fetch", {"url": "x"}, allow=["add", "echo"]),
                          "succeeded", None),
    "invalid_json": (tool_path("add", '{"a": 1, "b": '), "succeeded", None),
    "invalid_schema": (tool_path("add", {"a": "one", "b": 2}), "succeeded", None),
    "nested_arrays": (tool_path("echo", DEEP_ARRAY), "succeeded", None),
    "nested_objects": (tool_path("echo", DEEP_OBJECT), "succeeded", None),
    "payload_too_large": (tool_path("echo", {"text": "x" * 300_000}), "succeeded", None),
    "circuit_open": (lambda store: _scripted(store, [_call("flaky"), _call("flaky"), "ok"]),
                     "succeeded", None),
    # tool failures
    "tool_error": (tool_path("boom"), "succeeded", None),
    "tool_sys_exit": (tool_path("exits"), "succeeded", None),
    "tool_keyboard_interrupt": (tool_path("interrupts"), "succeeded", None),
    "tool_generator_exit": (tool_path("generator_exit"), "succeeded", None),
    "tool_timeout": (tool_path("slow"), "succeeded", None),
    "invalid_output": (tool_path("liar"), "succeeded", None),
    "deep_result": (tool_path("deep_result"), "succeeded", None),
    "unprintable_result": (tool_path("unprintable"), "succeeded", None),
    # bad text
    "surrogate_in_model_text": (model_path("answer \ud800 end"), "succeeded", None),
    "surrogate_in_arguments": (tool_path("echo", '{"text": "a\\ud800b"}'), "succeeded", None),
    "raw_surrogate_in_arguments": (tool_path("echo", '{"text": "a\udfffb"}'), "succeeded",
                                   None),
    "surrogate_in_result": (tool_path("surrogate_result"), "succeeded", None),
    "surrogate_in_tool_error": (tool_path("surrogate_error"), "succeeded", None),
    "nul_in_model_text": (model_path("answer \x00 end"), "succeeded", None),
    "nul_in_arguments": (tool_path("echo", '{"text": "a\\u0000b"}'), "succeeded", None),
    # model failures end the run
    "model_error": (model_path(ModelError("provider down")), "failed", "model_error"),
    "model_bug": (model_path(RuntimeError("glue bug")), "failed", "internal_error"),
    "model_sys_exit": (model_path(SystemExit(3)), "failed", "internal_error"),
    "malformed_int": (model_path(42), "failed", "malformed_model_output"),
    "malformed_dict": (model_path({"answer": "x"}), "failed", "malformed_model_output"),
    "malformed_list": (model_path(["a", "b"]), "failed", "malformed_model_output"),
    # budget
    "budget_refused": (tool_path("add", {"a": 1, "b": 2}, budget={"max_tool_calls": 0}),
                       "failed", "budget_exceeded"),
    "budget_overspent": (overspent_model, "failed", "budget_exceeded"),
    # lifecycle
    "approval_pending": (tool_path("echo", {"text": "x"}, approval_tools=["echo"]),
                         "waiting", None),
    "approval_expired": (approval_expires, "failed", "approval_expired"),
    "cancel_while_waiting": (cancel_while_waiting, "cancelled", "cancelled"),
    "cancel_mid_run": (cancel_mid_run, "cancelled", "cancelled"),
    "deadline": (deadline_passes, "timed_out", "deadline_exceeded"),
    "store_fault_mid_step": (store_fault_mid_step, "failed", "internal_error"),
}


async def check_invariant(store: Store, name: str) -> Ended:
    """Run scenario ``name`` and assert the invariant and its expected end."""
    scenario, state, code = SCENARIOS[name]
    ended = await scenario(store)
    run = ended.run
    assert run.state == state, (run.state, run.error_code, run.error_message)
    assert run.error_code == code, (run.error_code, run.error_message)
    assert run.state.terminal or run.state == "waiting"
    steps = await store.list_steps(run.id)
    assert steps, "every scenario journals at least one step"
    if run.state.terminal:
        started = [(s.seq, s.kind, s.name) for s in steps if s.status == "started"]
        assert not started, f"steps left started in a {run.state} run: {started}"
    assert "internal_error" not in json.dumps([s.error for s in steps]) or \
        code == "internal_error"
    return ended

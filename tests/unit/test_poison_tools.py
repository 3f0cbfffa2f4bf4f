"""A poison tool cannot take the engine down (DESIGN §2: no exception escapes the runner).

``sys.exit``, ``KeyboardInterrupt``, ``GeneratorExit`` or any other ``BaseException`` (but
cancellation) from a tool is one failed call: a ``tool_error`` step, a short cleaned message
for the model, the whole (redacted) story in the audit record, and the run goes on. A sync
tool that ignores its timeout is abandoned on a daemon thread instead of holding the process.
tests/e2e/test_poison_e2e.py drives the same through real ``alpaca run``/``alpaca worker``.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import pytest

from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.runner import MAX_ERROR_MESSAGE
from alpaca_engine.tools.decorator import tool
from tests.helpers import engine, workflow


class Poison(BaseException):
    """Neither an Exception nor a cancellation."""


RAISED: list[tuple[str, BaseException, str]] = [
    ("sys_exit", SystemExit(3), "SystemExit: 3"),
    ("keyboard_interrupt", KeyboardInterrupt(), "KeyboardInterrupt"),
    ("generator_exit", GeneratorExit("closed"), "GeneratorExit: closed"),
    ("custom_base_exception", Poison("bad"), "Poison: bad"),
]


def told(model: ScriptedModel) -> list[Any]:
    return [json.loads(m.content or "null") for m in model.calls[-1] if m.role == "tool"]


@pytest.mark.parametrize("limit", [30.0, None], ids=["timeout", "no_timeout"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize(("exc", "message"), [(e, m) for _, e, m in RAISED],
                         ids=[name for name, _, _ in RAISED])
async def test_a_base_exception_is_a_tool_error_and_the_run_goes_on(
        store, exc: BaseException, message: str, sync: bool, limit: float | None) -> None:
    def poison() -> str:
        if isinstance(exc, SystemExit):
            sys.exit(3)
        raise exc

    async def apoison() -> str:
        return poison()

    bad = tool(name="poison", timeout=limit)(poison if sync else apoison)
    model = ScriptedModel([{"tool": "poison"}, "carried on"])
    wf = workflow(model, [bad])
    run = await engine(store, wf).run(wf, "agent", "go")

    assert run.state == "succeeded" and run.output == "carried on"
    assert told(model) == [{"error": {"code": "tool_error", "message": message}}]
    step = (await store.list_steps(run.id))[1]
    assert step.status == "failed" and step.error == {"code": "tool_error", "message": message}
    [failed] = [a for a in await store.list_audit(run.id) if a.kind == "tool.failed"]
    assert failed.data["detail"] == message
    assert "in poison" in failed.data["traceback"]  # where it happened, for the operator


async def test_the_model_gets_a_bounded_message_and_the_audit_keeps_all(store) -> None:
    @tool
    def chatty() -> str:
        raise RuntimeError("first line\n" + "x" * 5000)

    model = ScriptedModel([{"tool": "chatty"}, "ok"])
    wf = workflow(model, [chatty])
    run = await engine(store, wf).run(wf, "agent", "go")
    [result] = told(model)
    text = result["error"]["message"]
    assert text.startswith("RuntimeError: first line xxx") and "\n" not in text
    assert len(text) == MAX_ERROR_MESSAGE and text.endswith("…")
    [failed] = [a for a in await store.list_audit(run.id) if a.kind == "tool.failed"]
    assert len(failed.data["detail"]) > 5000


async def test_a_sync_tool_ignoring_its_timeout_is_abandoned_on_a_daemon_thread(store) -> None:
    release = threading.Event()
    entered = threading.Event()

    @tool(timeout=0.5)
    def stuck() -> str:
        entered.set()
        release.wait(120)  # like time.sleep(12): nothing can interrupt it
        return "too late"

    model = ScriptedModel([{"tool": "stuck"}, "moved on"])
    wf = workflow(model, [stuck])
    try:
        run = await engine(store, wf).run(wf, "agent", "go")
        assert entered.is_set()
        assert run.state == "succeeded" and run.output == "moved on"
        assert told(model)[0]["error"]["code"] == "tool_timeout"
        # still running, but on a daemon thread: interpreter exit will not wait for it
        stuck_threads = [t for t in threading.enumerate() if t.name.startswith("alpaca-tool")
                         and t.is_alive()]
        assert stuck_threads and all(t.daemon for t in stuck_threads)
    finally:
        release.set()


async def test_sync_tools_keep_their_context_and_do_not_wait_for_a_stuck_one(store) -> None:
    from alpaca_engine.telemetry.logging import current_fields

    release = threading.Event()
    seen: list[Any] = []

    @tool(timeout=0.5)
    def stuck() -> str:
        release.wait(120)
        return "late"

    @tool
    def where() -> str:
        seen.append(current_fields()["run_id"])
        return threading.current_thread().name

    model = ScriptedModel([{"tool": "stuck"}, {"tool": "where"}, "ok"])
    wf = workflow(model, [stuck, where])
    try:
        run = await engine(store, wf).run(wf, "agent", "go")
        assert run.state == "succeeded"
        assert told(model)[1].startswith("alpaca-tool")  # another thread served it
        assert seen == [run.id]  # the run's log context reached the thread
    finally:
        release.set()

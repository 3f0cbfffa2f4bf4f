"""A tool's timeout (tools.base.bounded) ends a call every way ``asyncio.wait_for`` ends it:
result, exception, timeout, cancellation, context variables."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from alpaca_engine.tools.base import AbruptExit, bounded, guarded

# wait_for with no time left never starts the call (nor does bounded): its coroutine is
# closed unawaited.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_tool_timeout", default="outer")
Call = Callable[[list[str]], Coroutine[Any, Any, Any]]


async def returns(log: list[str]) -> Any:
    await asyncio.sleep(0)
    return "value"


async def returns_at_once(log: list[str]) -> Any:
    return "value"


async def raises(log: list[str]) -> Any:
    await asyncio.sleep(0)
    raise ValueError("bad")


async def sleeps(log: list[str]) -> Any:
    try:
        await asyncio.sleep(10)
    finally:
        log.append("cleaned up")


async def swallows_then_returns(log: list[str]) -> Any:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        log.append("swallowed")
    await asyncio.sleep(0)
    return "late value"


async def swallows_then_raises(log: list[str]) -> Any:
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        raise ValueError("cancelled, so failing") from None


async def own_timeout(log: list[str]) -> Any:
    try:
        async with asyncio.timeout(0.001):
            await asyncio.sleep(10)
    except TimeoutError:
        return "own timeout handled"


async def thread(log: list[str]) -> Any:
    return await asyncio.to_thread(lambda: "from a thread")


async def sets_var(log: list[str]) -> Any:
    seen = VAR.get()
    VAR.set("inner")
    await asyncio.sleep(0)
    return seen, VAR.get()


async def exits(log: list[str]) -> Any:
    await asyncio.sleep(0)
    raise SystemExit(3)


def _generator_exit() -> None:
    raise GeneratorExit


async def thread_generator_exit(log: list[str]) -> Any:
    """What an awaited future raises reaches the task that awaits it: a GeneratorExit there
    would close every frame above it."""
    return await asyncio.to_thread(_generator_exit)


async def cancels_itself(log: list[str]) -> Any:
    asyncio.current_task().cancel()
    await asyncio.sleep(0)
    return "never"


CALLS = [returns, returns_at_once, raises, sleeps, swallows_then_returns,
         swallows_then_raises, own_timeout, thread, sets_var, exits, thread_generator_exit,
         cancels_itself]


async def outcome(run: Callable[[Coroutine[Any, Any, Any], float], Awaitable[Any]],
                  call: Call, seconds: float) -> tuple[Any, ...]:
    log: list[str] = []
    token = VAR.set("caller")
    try:
        result: Any = ("returned", await run(guarded(call(log)), seconds))
    except BaseException as exc:  # the outcome is what is compared
        result = ("raised", type(exc).__name__, str(exc))
    after = VAR.get()
    VAR.reset(token)
    return result, log, after


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("seconds", [0.05, 0, -1])
async def test_bounded_ends_a_call_as_wait_for_does(call, seconds):
    assert await outcome(bounded, call, seconds) == await outcome(asyncio.wait_for, call, seconds)


async def test_the_call_has_a_copy_of_the_callers_context():
    VAR.set("caller")

    async def probe() -> Any:
        seen = VAR.get()
        VAR.set("inner")
        return seen

    assert await bounded(probe(), 5) == "caller"
    assert VAR.get() == "caller"


async def test_a_timeout_cancels_the_call_and_raises():
    log: list[str] = []
    with pytest.raises(TimeoutError):
        await bounded(sleeps(log), 0.01)
    assert log == ["cleaned up"]
    assert asyncio.current_task().cancelling() == 0


async def test_a_system_exit_in_the_call_is_one_failed_call():
    with pytest.raises(AbruptExit):
        await bounded(guarded(exits([])), 5)


@pytest.mark.parametrize("call", [sleeps, swallows_then_returns, swallows_then_raises],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("run", [bounded, asyncio.wait_for], ids=["bounded", "wait_for"])
async def test_cancelling_the_caller_cancels_it_whatever_the_call_does(run, call):
    """The runner's task is cancelled when its lease is lost: a tool that swallows the
    cancellation must not keep the run going (wait_for raises CancelledError too)."""
    log: list[str] = []
    started = asyncio.Event()

    async def caller() -> Any:
        started.set()
        return await run(call(log), 5)

    task = asyncio.ensure_future(caller())
    await started.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

"""What a tool is to the engine, whatever its source (Python function, HTTP endpoint, MCP)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .breaker import BreakerPolicy
from .contracts import Contract
from .retry import NO_RETRY, RetryPolicy

T = TypeVar("T")


class AbruptExit(Exception):
    """Tool or model code raised ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit`` or
    another ``BaseException``: to the engine that is one failed call, not the end of the
    process (a worker serves other runs; ``alpaca run`` must record the outcome)."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


async def guarded(call: Awaitable[T]) -> T:
    """Await untrusted code, turning any ``BaseException`` but cancellation into AbruptExit.

    It must wrap the coroutine *inside* any task that runs it (``asyncio.wait_for`` makes
    one): a SystemExit leaving a task's step is re-raised by the event loop itself and stops
    it, whoever awaits the task."""
    try:
        return await call
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise AbruptExit(exc) from None


async def bounded(call: Coroutine[Any, Any, T], seconds: float) -> T:
    """``asyncio.wait_for(call, seconds)``, ending every way it ends, for less.

    wait_for (3.11) puts a waiter future and its callbacks between the caller and the task
    that runs ``call``: one more turn of the event loop for every tool call. Here the caller
    awaits the task itself and a timer cancels it. The task is kept: ``call`` has a context
    of its own (what it sets in a context variable stays its own), and what its awaits
    raise never passes through the caller's frames (a GeneratorExit would close them).

    Its result or exception is the caller's; when ``seconds`` pass first it is cancelled
    and the caller gets TimeoutError, unless it returns or raises anyway; a cancellation of
    the caller cancels it, waits for it and ends in CancelledError, whatever it did with
    it. ``seconds`` of 0 or less is wait_for's own case (the call never starts)."""
    if seconds <= 0:
        return await asyncio.wait_for(call, seconds)
    caller = asyncio.current_task()
    assert caller is not None, "bounded() runs inside a task"
    cancelling = caller.cancelling()
    loop = asyncio.get_running_loop()
    task = loop.create_task(call)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(seconds, expire)
    try:
        result = await task
    except asyncio.CancelledError:
        if expired and caller.cancelling() == cancelling:
            raise TimeoutError from None
        raise
    except BaseException:
        if caller.cancelling() > cancelling:  # the caller was cancelled: the call's answer
            raise asyncio.CancelledError from None  # to it does not count (as wait_for)
        raise
    finally:
        timer.cancel()
    if caller.cancelling() > cancelling:
        raise asyncio.CancelledError
    return result


@dataclass(frozen=True)
class ToolContext:
    """Handed to every tool call. ``idempotency_key`` is identical on every retry and resume."""

    run_id: str
    step: int
    idempotency_key: str
    attempt: int = 1
    agent: str = ""
    tenant: str = "local"


Invoke = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]
ApprovalRule = Literal["never", "required"]


@dataclass
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    invoke: Invoke
    output_schema: dict[str, Any] | None = None
    capabilities: frozenset[str] = frozenset()
    retry: RetryPolicy = NO_RETRY
    breaker: BreakerPolicy | None = None
    timeout: float | None = 30.0
    approval: ApprovalRule = "never"
    source: str = "python"
    cost: float = 0.0
    """Declared USD cost of one call (charged to the budget; approval policies may gate it)."""
    _input_contract: Contract | None = field(default=None, repr=False)
    _output_contract: Contract | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._input_contract = Contract(self.input_schema)
        if self.output_schema is not None:
            self._output_contract = Contract(self.output_schema)

    def input_errors(self, args: dict[str, Any]) -> list[str]:
        assert self._input_contract is not None
        return self._input_contract.errors(args)

    def output_errors(self, result: Any) -> list[str]:
        if self._output_contract is None:
            return []
        return self._output_contract.errors(result)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
            "capabilities": sorted(self.capabilities),
            "retry": vars(self.retry),
            "breaker": vars(self.breaker) if self.breaker else None,
            "timeout": self.timeout,
            "approval": self.approval,
            "cost": self.cost,
        }

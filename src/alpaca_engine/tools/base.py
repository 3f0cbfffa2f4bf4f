"""What a tool is to the engine, whatever its source (Python function, HTTP endpoint, MCP)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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

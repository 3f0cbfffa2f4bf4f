"""The StepRunner: one sequential, deterministic loop per run (DESIGN §2).

Ask the model, execute its tool calls one at a time in the order given, feed results back,
repeat. Every tool call passes the same gate (lookup, permission, input contract, budget,
breaker, execute with retry, output contract); each outcome is journaled and audited, and
every exit path ends in a recorded run state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .agents import Agent
from .clock import Clock, SystemClock
from .errors import AlpacaError, ErrorCode, LeaseLost
from .events import EventSink, discard
from .journal import Conversation, Journal, idempotency_key, tool_message
from .lifecycle import RunState
from .models.base import Message, ModelError, ModelResponse, ToolCall, ToolSpec
from .store.base import Store
from .store.records import AuditEvent, RunRecord, StepKind, StepRecord, StepStatus
from .tools.base import Tool, ToolContext
from .tools.breaker import CircuitBreaker
from .tools.contracts import DEFAULT_MAX_PAYLOAD_BYTES, parse_arguments, payload_size
from .tools.governance import check_tool
from .tools.retry import call_with_retry, default_is_transient
from .workflow import Workflow

log = logging.getLogger("alpaca.runner")


@dataclass
class Usage:
    steps: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Breakers:
    """In-process circuit breakers by tool name (the local coordination backend)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, tool: Tool) -> CircuitBreaker | None:
        if tool.breaker is None:
            return None
        breaker = self._breakers.get(tool.name)
        if breaker is None:
            breaker = CircuitBreaker(tool.name, tool.breaker, self._clock)
            self._breakers[tool.name] = breaker
        return breaker

    def all(self) -> dict[str, CircuitBreaker]:
        return dict(self._breakers)


@dataclass
class _ToolOutcome:
    result: Any
    error: dict[str, Any] | None = None
    attempts: int = 1
    audit: list[AuditEvent] = field(default_factory=list)


def _err(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": str(code), "message": message, **extra}


class StepRunner:
    def __init__(
        self,
        run: RunRecord,
        workflow: Workflow,
        store: Store,
        *,
        clock: Clock | None = None,
        breakers: Breakers | None = None,
        emit: EventSink = discard,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.run_record = run
        self.workflow = workflow
        self.store = store
        self.epoch = run.epoch
        self.clock = clock or SystemClock()
        self.breakers = breakers or Breakers(self.clock)
        self._sink = emit
        self.max_payload_bytes = max_payload_bytes
        self.usage = Usage()

    def emit(self, event: dict[str, Any]) -> None:
        """Progress displays must never break a run."""
        try:
            self._sink(event)
        except Exception:
            log.exception("event sink failed on %s", event.get("type"))

    # -- public --------------------------------------------------------------------------------
    async def run(self) -> RunRecord:
        """Drive the run to a recorded state. Only LeaseLost escapes: the new owner decides."""
        try:
            try:
                agent = self.workflow.agent(self.run_record.agent)
            except KeyError as exc:
                raise AlpacaError(ErrorCode.CONFIG_ERROR, str(exc.args[0])) from None
            return await self._loop(agent)
        except LeaseLost:
            raise
        except _Stop as stop:
            return await self._finish(stop.state, error=stop)
        except AlpacaError as exc:
            return await self._finish(RunState.FAILED, error=exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await self._finish(
                RunState.FAILED,
                error=AlpacaError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"),
            )

    # -- the loop ------------------------------------------------------------------------------
    async def _loop(self, agent: Agent) -> RunRecord:
        run = self.run_record
        journal = Journal(await self.store.list_steps(run.id))
        messages = Conversation()
        if agent.instructions:
            messages.append(Message(role="system", content=agent.instructions))
        messages.append(Message(role="user", content=run.input))
        specs = self._visible_tools(agent)
        seq = 0
        turns = 0
        while True:
            await self._check_interrupts()
            if turns >= agent.max_steps:
                raise AlpacaError(
                    ErrorCode.MAX_STEPS, f"agent {agent.name!r} reached max_steps={agent.max_steps}"
                )
            seq += 1
            turns += 1
            response = await self._model_step(agent, seq, messages, specs, journal)
            messages.append(response.as_message())
            if not response.tool_calls:
                return await self._finish(RunState.SUCCEEDED, output=response.content or "")
            for call in response.tool_calls:
                seq += 1
                result = await self._tool_step(agent, seq, call, journal)
                messages.append(tool_message(call.id, call.name, result))

    def _visible_tools(self, agent: Agent) -> list[ToolSpec]:
        """The model only ever sees tools it is permitted to call."""
        specs = []
        for t in self.workflow.tools:
            if check_tool(t, agent.tools, agent.capabilities).allowed:
                specs.append(ToolSpec(name=t.name, description=t.description,
                                      parameters=t.input_schema))
        return specs

    async def _check_interrupts(self) -> None:
        budget = self.run_record.budget
        deadline = budget.get("deadline")
        if deadline is not None and self.clock.now() > float(deadline):
            raise _Stop(RunState.TIMED_OUT, AlpacaError(
                ErrorCode.DEADLINE_EXCEEDED, "the run's wall-clock deadline passed"))
        current = await self.store.get_run(self.run_record.id)
        if current.epoch != self.epoch:
            raise LeaseLost(current.id, self.epoch)
        if current.cancel_requested:
            raise _Stop(RunState.CANCELLED, AlpacaError(ErrorCode.CANCELLED, "cancelled by user"))

    def _check_budget(self, kind: StepKind) -> None:
        budget = self.run_record.budget
        checks = [("max_steps", self.usage.steps + 1)]
        if kind == StepKind.TOOL:
            checks.append(("max_tool_calls", self.usage.tool_calls + 1))
        else:
            checks.append(("max_tokens", self.usage.input_tokens + self.usage.output_tokens))
        for key, needed in checks:
            limit = budget.get(key)
            if limit is not None and needed > int(limit):
                raise AlpacaError(ErrorCode.BUDGET_EXCEEDED,
                                  f"budget {key}={limit} exhausted", usage=self.usage.as_dict())

    # -- model steps ---------------------------------------------------------------------------
    async def _model_step(
        self, agent: Agent, seq: int, messages: Conversation, specs: list[ToolSpec],
        journal: Journal,
    ) -> ModelResponse:
        digest = messages.digest()
        done = journal.finished(seq, StepKind.MODEL)
        if done is not None:
            if done.input.get("digest") != digest:
                raise AlpacaError(ErrorCode.INTERNAL_ERROR,
                                  f"journal replay diverged at step {seq}: conversation differs")
            if done.status == StepStatus.FAILED:
                raise AlpacaError(ErrorCode.MODEL_ERROR, (done.error or {}).get("message", ""))
            response = ModelResponse.model_validate(done.output)
            self._count(StepKind.MODEL, response)
            return response
        self._check_budget(StepKind.MODEL)
        step = StepRecord(run_id=self.run_record.id, seq=seq, kind=StepKind.MODEL,
                          name=agent.model.name, input={"digest": digest,
                                                        "messages": len(messages)},
                          started_at=self.clock.now())
        if journal.get(seq) is None:
            await self.store.save_step(step, self.epoch)
        self.emit({"type": "step.started", "run_id": step.run_id, "seq": seq, "kind": "model",
                   "name": step.name})
        t0 = time.perf_counter()
        try:
            response = await agent.model.complete(list(messages.messages), specs)
        except ModelError as exc:
            error = _err(ErrorCode.MODEL_ERROR, str(exc), transient=exc.transient)
            await self._save_finished(step, StepStatus.FAILED, None, error, 1, [
                AuditEvent(kind="model.error", data=error)])
            raise AlpacaError(ErrorCode.MODEL_ERROR, f"model {agent.model.name}: {exc}") from exc
        self._count(StepKind.MODEL, response)
        audit = [AuditEvent(kind="model.output", data={
            "step": seq, "model": response.model or agent.model.name,
            "content": response.content,
            "tool_calls": [c.model_dump() for c in response.tool_calls],
            "usage": response.usage.model_dump()})]
        await self._save_finished(step, StepStatus.COMPLETED, response.model_dump(), None, 1,
                                  audit)
        self.emit({"type": "step.completed", "run_id": step.run_id, "seq": seq, "kind": "model",
                   "name": step.name, "content": response.content,
                   "tool_calls": [c.name for c in response.tool_calls],
                   "ms": round((time.perf_counter() - t0) * 1000, 2)})
        return response

    def _count(self, kind: StepKind, response: ModelResponse | None = None) -> None:
        self.usage.steps += 1
        if kind == StepKind.TOOL:
            self.usage.tool_calls += 1
        if response is not None:
            self.usage.input_tokens += response.usage.input_tokens
            self.usage.output_tokens += response.usage.output_tokens

    async def _save_finished(self, step: StepRecord, status: StepStatus, output: Any,
                             error: dict[str, Any] | None, attempts: int,
                             audit: Sequence[AuditEvent]) -> None:
        step.status, step.output, step.error = status, output, error
        step.attempts, step.finished_at = attempts, self.clock.now()
        await self.store.save_step(step, self.epoch, audit)

    # -- tool steps ----------------------------------------------------------------------------
    async def _tool_step(
        self, agent: Agent, seq: int, call: ToolCall, journal: Journal
    ) -> Any:
        done = journal.finished(seq, StepKind.TOOL)
        if done is not None:
            self._count(StepKind.TOOL)
            return {"error": done.error} if done.error else done.output
        key = idempotency_key(self.run_record.id, seq)
        step = StepRecord(run_id=self.run_record.id, seq=seq, kind=StepKind.TOOL, name=call.name,
                          input={"call_id": call.id, "arguments": call.arguments},
                          idempotency_key=key, started_at=self.clock.now())
        self.emit({"type": "step.started", "run_id": step.run_id, "seq": seq, "kind": "tool",
                   "name": call.name, "arguments": call.arguments})
        t0 = time.perf_counter()
        outcome = await self._gate_and_execute(agent, seq, call, step, journal, key)
        self._count(StepKind.TOOL)
        status = StepStatus.FAILED if outcome.error else StepStatus.COMPLETED
        await self._save_finished(step, status, outcome.result, outcome.error, outcome.attempts,
                                  outcome.audit)
        self.emit({"type": "step.completed", "run_id": step.run_id, "seq": seq, "kind": "tool",
                   "name": call.name, "arguments": call.arguments, "error": outcome.error,
                   "result": outcome.result,
                   "ms": round((time.perf_counter() - t0) * 1000, 2)})
        return {"error": outcome.error} if outcome.error else outcome.result

    async def _gate_and_execute(
        self, agent: Agent, seq: int, call: ToolCall, step: StepRecord, journal: Journal,
        key: str,
    ) -> _ToolOutcome:
        def refuse(code: ErrorCode, message: str, kind: str, **extra: Any) -> _ToolOutcome:
            error = _err(code, message, **extra)
            return _ToolOutcome(None, error, 1, [AuditEvent(kind=kind, data={
                "step": seq, "tool": call.name, **error})])

        # 1. lookup
        tool = self.workflow.tools.get(call.name)
        if tool is None:
            return refuse(ErrorCode.UNKNOWN_TOOL, f"no tool named {call.name!r}",
                          "gate.unknown_tool")
        # 2. permission
        decision = check_tool(tool, agent.tools, agent.capabilities)
        if not decision.allowed:
            return refuse(ErrorCode.PERMISSION_DENIED, decision.rule, "gate.permission_denied",
                          rule=decision.rule)
        audit = [AuditEvent(kind="gate.permission_allowed",
                            data={"step": seq, "tool": tool.name, "rule": decision.rule})]
        # 3. input contract
        if len(call.arguments.encode()) > self.max_payload_bytes:
            return refuse(ErrorCode.PAYLOAD_TOO_LARGE,
                          f"arguments exceed {self.max_payload_bytes} bytes", "gate.invalid")
        args, parse_error = parse_arguments(call.arguments)
        problems = [parse_error] if parse_error else tool.input_errors(args or {})
        if problems or args is None:
            out = refuse(ErrorCode.INVALID_ARGUMENTS, "; ".join(problems), "gate.invalid_arguments")
            out.audit[:0] = audit
            return out
        # 4. budget
        self._check_budget(StepKind.TOOL)
        # 6. circuit breaker
        breaker = self.breakers.get(tool)
        if breaker is not None and not breaker.allow():
            out = refuse(ErrorCode.CIRCUIT_OPEN, f"circuit for {tool.name!r} is open",
                         "gate.circuit_open", retry_after=breaker.retry_after())
            out.audit[:0] = audit + self._breaker_events(breaker)
            return out
        # journal `started` (input and idempotency key) before the side effect happens
        step.input["args"] = args
        if journal.get(seq) is None:
            await self.store.save_step(step, self.epoch, audit)
            audit = []
        # 7. execute with timeout and retry
        attempts = 0

        async def attempt(n: int) -> Any:
            nonlocal attempts
            attempts = n
            ctx = ToolContext(run_id=self.run_record.id, step=seq, idempotency_key=key,
                              attempt=n, agent=agent.name, tenant=self.run_record.tenant)
            if tool.timeout is not None:
                return await asyncio.wait_for(tool.invoke(args, ctx), tool.timeout)
            return await tool.invoke(args, ctx)

        async def on_retry(n: int, exc: BaseException, delay: float) -> None:
            step.attempts = n + 1
            await self.store.save_step(step, self.epoch, [AuditEvent(kind="tool.retry", data={
                "step": seq, "tool": tool.name, "attempt": n, "error": _describe(exc),
                "delay": round(delay, 4)})])

        try:
            result = await call_with_retry(attempt, tool.retry, clock=self.clock,
                                           is_transient=default_is_transient, on_retry=on_retry)
        except TimeoutError:
            return self._tool_failed(tool, breaker, audit, seq, attempts, _err(
                ErrorCode.TOOL_TIMEOUT, f"tool {tool.name!r} timed out after {tool.timeout}s"))
        except ValidationError as exc:
            return self._tool_failed(tool, breaker, audit, seq, attempts, _err(
                ErrorCode.INVALID_ARGUMENTS, str(exc)), count_failure=False)
        except (LeaseLost, asyncio.CancelledError):
            raise
        except Exception as exc:
            return self._tool_failed(tool, breaker, audit, seq, attempts,
                                     _err(ErrorCode.TOOL_ERROR, _describe(exc)))
        # 8. output contract
        problems = tool.output_errors(result)
        if not problems and payload_size(result) > self.max_payload_bytes:
            problems = [f"result exceeds {self.max_payload_bytes} bytes"]
        if problems:
            return self._tool_failed(tool, breaker, audit, seq, attempts, _err(
                ErrorCode.INVALID_OUTPUT, "; ".join(problems)))
        if breaker is not None:
            breaker.record_success()
            audit += self._breaker_events(breaker)
        audit.append(AuditEvent(kind="tool.result", data={"step": seq, "tool": tool.name,
                                                          "attempts": attempts}))
        return _ToolOutcome(result, None, attempts, audit)

    def _tool_failed(self, tool: Tool, breaker: CircuitBreaker | None, audit: list[AuditEvent],
                     seq: int, attempts: int, error: dict[str, Any],
                     count_failure: bool = True) -> _ToolOutcome:
        if breaker is not None and count_failure:
            breaker.record_failure()
            audit = audit + self._breaker_events(breaker)
        audit.append(AuditEvent(kind="tool.failed", data={"step": seq, "tool": tool.name,
                                                          "attempts": attempts, **error}))
        return _ToolOutcome(None, error, max(attempts, 1), audit)

    @staticmethod
    def _breaker_events(breaker: CircuitBreaker) -> list[AuditEvent]:
        return [AuditEvent(kind="breaker.transition", data={
            "tool": t.tool, "from": str(t.from_state), "to": str(t.to_state),
            "reason": t.reason}) for t in breaker.drain_transitions()]

    # -- ending --------------------------------------------------------------------------------
    async def _finish(self, state: RunState, *, output: str | None = None,
                      error: AlpacaError | None = None) -> RunRecord:
        record = await self.store.transition(
            self.run_record.id, state, self.clock.now(), epoch=self.epoch, output=output,
            error_code=str(error.code) if error else None,
            error_message=error.message if error else None, usage=self.usage.as_dict())
        self.run_record = record
        self.emit({"type": "run.finished", "run_id": record.id, "state": str(record.state),
                   "output": record.output, "error_code": record.error_code,
                   "error_message": record.error_message, "usage": record.usage})
        return record


class _Stop(AlpacaError):
    """Ends the run in a state other than ``failed`` (cancelled, timed out)."""

    def __init__(self, state: RunState, error: AlpacaError) -> None:
        super().__init__(error.code, error.message)
        self.state = state


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text

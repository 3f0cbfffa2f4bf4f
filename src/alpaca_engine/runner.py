"""The StepRunner: one sequential, deterministic loop per run (DESIGN §2).

Ask the model, execute its tool calls one at a time in the order given, feed results back,
repeat. Every tool call passes the same gate (lookup, permission, input contract, budget,
approval, breaker, execute with retry, output contract); each outcome is journaled and
audited, and every exit path ends in a recorded run state (terminal, or waiting on an
approval or a child run).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from . import budget as ledger_logic
from . import delegation, history, typed_output
from .agents import Agent
from .clock import Clock, SystemClock
from .coord.base import BreakerBoard, Outcome
from .coord.local import LocalBreakerBoard
from .deltas import DeltaEvents
from .errors import AlpacaError, ErrorCode, LeaseLost, NotFound, Paused
from .events import EventSink, discard
from .faults import Unavailable
from .journal import (
    Conversation,
    Journal,
    estimate_tokens,
    idempotency_key,
    recorded_response,
    recorded_result,
    tool_message,
)
from .lifecycle import RunState
from .models.base import (
    MalformedModelOutput,
    Message,
    ModelError,
    ModelResponse,
    ModelSettings,
    ToolCall,
    ToolSpec,
    ask_model,
    retry_hook,
)
from .store.base import RunFlags, StepWrite, Store
from .store.records import (
    ApprovalRecord,
    ApprovalStatus,
    AuditEvent,
    LedgerRecord,
    RunRecord,
    StepKind,
    StepRecord,
    StepStatus,
)
from .telemetry import tracing
from .telemetry.logging import bind, redact_text, redact_value
from .telemetry.metrics import METRICS, Metrics
from .tools.base import AbruptExit, Tool, ToolContext, bounded, guarded
from .tools.breaker import Transition
from .tools.contracts import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    nesting_exceeds,
    parse_arguments,
    payload_size,
    too_deep_message,
)
from .tools.governance import OPEN_POLICY, TenantPolicy, check_tool
from .tools.retry import call_with_retry, default_is_transient
from .wakeups import wake
from .workflow import Workflow

log = logging.getLogger("alpaca.runner")


@dataclass
class Usage:
    steps: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if k != "cost" or v}


@dataclass
class _Outcome:
    result: Any
    error: dict[str, Any] | None = None
    attempts: int = 1
    audit: list[AuditEvent] = field(default_factory=list)
    settle: dict[str, float] | None = None


class _Wait(Paused):
    """The run pauses: an approval is pending or a child run has not finished."""

    def __init__(self, reason: str, child_id: str | None = None) -> None:
        super().__init__(reason)
        self.child_id = child_id


class _Stop(AlpacaError):
    """Ends the run in a state other than ``failed`` (cancelled, timed out)."""

    def __init__(self, state: RunState, error: AlpacaError) -> None:
        super().__init__(error.code, error.message)
        self.state = state


def _cancelled() -> _Stop:
    return _Stop(RunState.CANCELLED, AlpacaError(ErrorCode.CANCELLED, "cancelled by user"))


MAX_ERROR_MESSAGE = 500
"""Error text the model and the journal get is this long at most; the audit keeps the rest."""
_TRACEBACK_FRAMES = 12


def _err(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    """A structured error for the journal and the model: redacted, one line, bounded."""
    text = " ".join(redact_text(message).split())
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[:MAX_ERROR_MESSAGE - 1] + "…"
    return {"code": str(code), "message": text, **extra}


def _describe(exc: BaseException) -> str:
    """``Type: text`` of an exception (of the BaseException a tool raised, for AbruptExit)."""
    if isinstance(exc, AbruptExit):
        exc = exc.original
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _detail(exc: BaseException) -> dict[str, Any]:
    """The full story of a tool's exception for the audit record (AuditEvent redacts it)."""
    original = exc.original if isinstance(exc, AbruptExit) else exc
    frames = traceback.format_exception(original, limit=-_TRACEBACK_FRAMES)
    return {"detail": _describe(exc), "traceback": "".join(frames)[-8000:]}


def _redacted(response: ModelResponse) -> ModelResponse:
    """The model's turn with secrets and unencodable text removed, once, before anything
    (journal, audit, progress events, the run's output, the next request) sees it."""
    return ModelResponse(
        content=redact_text(response.content) if response.content is not None else None,
        tool_calls=[ToolCall(id=redact_text(c.id), name=redact_text(c.name),
                             arguments=redact_text(c.arguments)) for c in response.tool_calls],
        usage=response.usage, finish_reason=response.finish_reason,
        model=redact_text(response.model) if response.model is not None else None)


def _estimate_tokens(messages: Conversation) -> int:
    """A cheap upper-ish estimate (4 characters a token) for the budget reservation."""
    return estimate_tokens(messages.chars, len(messages))


class StepRunner:
    def __init__(
        self,
        run: RunRecord,
        workflow: Workflow,
        store: Store,
        *,
        clock: Clock | None = None,
        breakers: BreakerBoard | None = None,
        emit: EventSink = discard,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        metrics: Metrics = METRICS,
        tenant_policy: TenantPolicy = OPEN_POLICY,
        on_queued: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.run_record = run
        self.workflow = workflow
        self.store = store
        self.epoch = run.epoch
        self.clock = clock or SystemClock()
        self.breakers: BreakerBoard = breakers or LocalBreakerBoard(self.clock)
        self._sink = emit
        self.max_payload_bytes = max_payload_bytes
        self.metrics = metrics
        self.tenant_policy = tenant_policy
        self.on_queued = on_queued
        self.usage = Usage()
        self._interrupted: set[int] = set()
        self._seen: RunFlags | None = RunFlags(run.epoch, run.cancel_requested)
        """The run's flags as the last journal write since the interrupt check saw them (at
        first, as the claim that leased the run read them)."""
        self._open: StepRecord | None = None
        """The step journaled ``started`` whose outcome is not yet in the journal or in
        :attr:`_pending`."""
        self._pending: list[StepWrite] = []
        """Outcomes not yet written: they go with the next step's ``started`` (one commit a
        step instead of two). Nothing is awaited while one waits here (the next journal
        write is the next await), so only CPU time separates it from its commit; every
        other store call writes them first (:meth:`_journal`), the pause and the end with
        the run's move (``Store.transition``'s ``steps``)."""
        self._history_audit: list[AuditEvent] = []
        """``history.truncated``, written with the first model step (once, even on resume)."""
        self.delegated: bool | None = None
        """Whether this run's journal holds a delegation (``None``: not read): without one
        it has no child run (a child is created after its delegation step is journaled)."""

    def emit(self, event: dict[str, Any]) -> None:
        """Progress displays must never break a run."""
        try:
            self._sink(event)
        except Exception:
            log.exception("event sink failed on %s", event.get("type"))

    # -- public --------------------------------------------------------------------------------
    async def run(self) -> RunRecord:
        """Drive the run to a recorded state. Only LeaseLost escapes (the new owner decides),
        and an unusable store (``Unavailable``: a terminal state could not be written either;
        the journal holds every step up to the one in flight, so a resume continues it)."""
        try:
            try:
                agent = self.workflow.agent(self.run_record.agent)
            except KeyError as exc:
                raise AlpacaError(ErrorCode.CONFIG_ERROR, str(exc.args[0])) from None
            return await self._loop(agent)
        except (LeaseLost, asyncio.CancelledError, Unavailable):
            raise
        except _Wait as wait:
            return await self._pause(wait)
        except _Stop as stop:
            return await self._fail(stop.state, stop)
        except AlpacaError as exc:
            return await self._fail(RunState.FAILED, exc)
        except Exception as exc:
            log.exception("run %s: unexpected error", self.run_record.id)
            return await self._fail(RunState.FAILED,
                                    AlpacaError(ErrorCode.INTERNAL_ERROR, _describe(exc)))

    async def _fail(self, state: RunState, error: AlpacaError) -> RunRecord:
        """End the run; a step left ``started`` by the exception is closed with it, and the
        outcomes pending are written with the end (one commit). When those writes fail, the
        run ends without them."""
        step = self._open
        if step is not None:
            settle = self._unreserve(step) if step.kind == StepKind.MODEL else None
            await self._save_finished(step, StepStatus.FAILED, None, _err(
                error.code, error.message), step.attempts, [], settle=settle)
        if self._pending:
            try:
                return await self._finish(state, error=error)
            except LeaseLost:
                raise
            except ledger_logic.BudgetExceeded:
                pass  # the outcome is written with its usage; the run ends as it was going to
            except Exception:  # a step left started is closed by the end (every store does)
                log.exception("run %s: could not write a step's outcome", self.run_record.id)
        return await self._finish(state, error=error)

    # -- the loop ------------------------------------------------------------------------------
    def capabilities(self, agent: Agent) -> frozenset[str] | None:
        caps = self.run_record.capabilities
        own = frozenset(caps) if caps is not None else agent.capabilities
        return self.tenant_policy.narrow(own)

    async def _loop(self, agent: Agent) -> RunRecord:
        run = self.run_record
        steps = await self.store.list_steps(run.id)
        self.delegated = any(s.kind == StepKind.DELEGATION for s in steps)
        journal = Journal(steps)
        self._interrupted = {s.seq for s in steps if s.status == StepStatus.STARTED}
        if steps:
            await self._check_ledgers()
        messages = Conversation()
        if agent.instructions:
            messages.append(Message(role="system", content=agent.instructions))
        for message in await self._history(agent):
            messages.append(message)
        messages.append(Message(role="user", content=run.input))
        granted = self.capabilities(agent)
        specs = self._visible_tools(agent, granted)
        seq = 0
        turns = 0
        rejected = 0
        while True:
            checked = await self._check_interrupts(starts_turn=turns < agent.max_steps)
            if turns >= agent.max_steps:
                raise AlpacaError(
                    ErrorCode.MAX_STEPS, f"agent {agent.name!r} reached max_steps={agent.max_steps}"
                )
            seq += 1
            turns += 1
            with bind(run_id=run.id, step=seq):
                response = await self._model_step(agent, seq, messages, specs, journal,
                                                  check_on_start=not checked)
            messages.append(response.as_message())
            if not response.tool_calls:
                verdict = self._final(agent, response, rejected)
                if verdict.problem is not None:  # a typed agent's answer was rejected
                    rejected += 1
                    messages.append(Message(role="user",
                                            content=typed_output.correction(verdict.problem)))
                    self.emit({"type": "output.invalid", "run_id": run.id, "seq": seq,
                               "message": verdict.problem})
                    continue
                return await self._finish(
                    RunState.SUCCEEDED, output=verdict.text or "",
                    output_type="json" if agent.output_contract is not None else "text")
            for call in response.tool_calls:
                seq += 1
                with bind(run_id=run.id, step=seq):
                    result = await self._tool_step(agent, seq, call, journal, granted)
                messages.append(tool_message(call.id, call.name, result))

    async def _history(self, agent: Agent) -> list[Message]:
        """A thread turn's earlier turns, rebuilt from their journals within the agent's
        history policy; what is left out is audited once, with the first model step."""
        run = self.run_record
        if run.thread_id is None or not run.turn or run.turn <= 1:
            return []
        earlier = []
        for turn in await self.store.list_turns(run.thread_id):
            if (turn.turn or 0) < run.turn:
                steps = await self.store.list_steps(turn.id) if (
                    turn.state == RunState.SUCCEEDED) else []
                earlier.append(history.past_turn(turn, steps))
        chosen = history.build(earlier, agent.history)
        if chosen.left_out:
            self._history_audit = [AuditEvent(kind="history.truncated",
                                              data=chosen.audit_data(agent.history))]
        return chosen.messages

    def _visible_tools(self, agent: Agent, granted: frozenset[str] | None) -> list[ToolSpec]:
        """The model only ever sees tools it is permitted to call (``granted``: the run's
        :meth:`capabilities`)."""
        specs = [ToolSpec(name=t.name, description=t.description, parameters=t.input_schema)
                 for t in self.workflow.tools
                 if check_tool(t, agent.tools, granted, self.tenant_policy).allowed]
        return specs + delegation.specs(agent, self.workflow.agents)

    async def _check_ledgers(self) -> None:
        """A resumed run stops if its tree's budget ran out meanwhile (an overspent
        settlement committed just before a crash, or a sibling's): replaying its journal
        must not end in ``succeeded``."""
        for ledger_id in self.run_record.ledgers:
            try:
                ledger = await self.store.get_ledger(ledger_id)
            except NotFound:
                continue
            if ledger.exhausted:
                resource = ledger.exhausted
                limit = ledger.limits.get(resource, 0.0)
                raise ledger_logic.BudgetExceeded(
                    ledger.id, resource, limit, ledger.used.get(resource, 0.0), 0.0,
                    f"budget exhausted: {resource} used {ledger.used.get(resource, 0.0):g} "
                    f"of {limit:g}")

    async def _check_interrupts(self, *, starts_turn: bool = True) -> bool:
        """The deadline, the lease and a cancel request, before a model turn. False: the
        flags are checked by the turn's ``started`` write instead (under the run's lock, in
        the commit that writes the outcomes still pending)."""
        deadline = self.run_record.budget.get("deadline")
        if deadline is not None and self.clock.now() > float(deadline):
            raise _Stop(RunState.TIMED_OUT, AlpacaError(
                ErrorCode.DEADLINE_EXCEEDED, "the run's wall-clock deadline passed"))
        if self._pending and starts_turn:
            return False
        await self._check_flags()
        return True

    async def _check_flags(self) -> None:
        """The lease and a cancel request, as the last journal write saw them under the
        run's lock (the outcomes still pending are written first, to be that write); with no
        write since the last check (a replayed turn), as the run is now."""
        await self._journal()
        seen, self._seen = self._seen, None
        current = seen or await self.store.get_run(self.run_record.id)
        if current.epoch != self.epoch:
            raise LeaseLost(self.run_record.id, self.epoch)
        if current.cancel_requested:
            raise _cancelled()

    # -- model steps ---------------------------------------------------------------------------
    async def _model_step(
        self, agent: Agent, seq: int, messages: Conversation, specs: list[ToolSpec],
        journal: Journal, *, check_on_start: bool = False,
    ) -> ModelResponse:
        digest = messages.digest()
        done = journal.finished(seq, StepKind.MODEL)
        if done is not None and check_on_start:  # a replayed turn: no start to check with
            await self._check_flags()
        if done is not None:
            if done.input.get("digest") != digest:
                raise AlpacaError(ErrorCode.INTERNAL_ERROR,
                                  f"journal replay diverged at step {seq}: conversation differs")
            if done.status == StepStatus.FAILED:
                error = done.error or {}
                code = str(error.get("code"))
                raise AlpacaError(ErrorCode(code) if code in set(ErrorCode)
                                  else ErrorCode.MODEL_ERROR, error.get("message", ""))
            response = recorded_response(done)
            self._count_model(response, self._price(agent.model.name, response.usage.input_tokens,
                                                    response.usage.output_tokens))
            return response
        model_name = agent.model.name
        estimate_in = _estimate_tokens(messages)
        reserve = {"steps": 1.0, "tokens": float(estimate_in + agent.max_output_tokens),
                   "cost": self._price(model_name, estimate_in, agent.max_output_tokens)}
        step = StepRecord(run_id=self.run_record.id, seq=seq, kind=StepKind.MODEL,
                          name=model_name, input={"digest": digest, "messages": len(messages)},
                          started_at=self.clock.now())
        first = self._history_audit if seq == 1 and seq not in self._interrupted else []
        if not await self._save_started(step, reserve, [*first, AuditEvent(
                kind="budget.reserved", data={"step": seq, **reserve})],
                unless_cancelled=check_on_start):
            raise _cancelled()
        self.emit({"type": "step.started", "run_id": step.run_id, "seq": seq, "kind": "model",
                   "name": model_name})
        t0 = time.perf_counter()
        provider = model_name.split(":", 1)[0] if ":" in model_name else model_name
        attempts = 1

        async def journal_retry(attempt: int, exc: BaseException, delay: float) -> None:
            nonlocal attempts
            attempts = attempt + 1
            step.attempts = attempts
            await self._journal(StepWrite(step, [AuditEvent(kind="model.retry", data={
                "step": seq, "model": model_name, "attempt": attempt, "error": _describe(exc),
                "delay": round(delay, 4)})]))

        token = retry_hook.set(journal_retry)
        settings = ModelSettings(max_output_tokens=agent.max_output_tokens,
                                 output_schema=agent.output_schema, output_name=agent.name)
        deltas = DeltaEvents(self.emit, step.run_id, seq, lambda: attempts)
        with tracing.model_span(model_name, provider=provider, step=seq) as span:
            try:
                response = await guarded(ask_model(agent.model, list(messages.messages),
                                                   specs, settings, deltas))
                if not isinstance(response, ModelResponse):
                    raise MalformedModelOutput(
                        f"complete() returned {type(response).__name__}; expected a "
                        "ModelResponse")
            except (LeaseLost, asyncio.CancelledError):
                raise
            except Exception as exc:
                # A provider failure, a malformed answer, or a bug (even a SystemExit) in a
                # function model: the step and the run record it, nothing escapes.
                code = exc.code if isinstance(exc, ModelError) else ErrorCode.INTERNAL_ERROR
                text = str(exc) if isinstance(exc, ModelError) else _describe(exc)
                error = _err(code, text, transient=getattr(exc, "transient", False))
                tracing.mark_error(span, str(code), error["message"])
                await self._save_finished(step, StepStatus.FAILED, None, error, attempts,
                                          [AuditEvent(kind="model.error", data=error)],
                                          settle=self._unreserve(step))
                raise AlpacaError(code, f"model {model_name}: {error['message']}") from None
            finally:
                retry_hook.reset(token)
            deltas.finish()
            response = _redacted(response)
            tracing.record_model_response(span, response.model, response.usage.input_tokens,
                                          response.usage.output_tokens, response.finish_reason)
        actual_tokens = response.usage.input_tokens + response.usage.output_tokens
        actual_cost = self._price(model_name, response.usage.input_tokens,
                                  response.usage.output_tokens)
        self._count_model(response, actual_cost)
        settle = {"tokens": actual_tokens - reserve["tokens"],
                  "cost": actual_cost - reserve["cost"]}
        # One dump of the turn for the journal and the audit (its calls are ToolCalls, made
        # by _redacted, so their part of it is what c.model_dump() gives). Built from the
        # redacted turn: no second scan of a long answer (see _redacted).
        output = response.model_dump()
        audit = [AuditEvent.of_redacted(kind="model.output", data={
            "step": seq, "model": response.model or model_name,
            "content": response.content, "tool_calls": output["tool_calls"],
            "usage": response.usage.model_dump(), "cost": actual_cost})]
        audit += self._output_audit(agent, seq, response)
        if settle["tokens"] > 0 or settle["cost"] > 1e-12:
            audit.append(AuditEvent(kind="budget.overrun", data={
                "step": seq, "reserved": reserve, "actual": {
                    "tokens": actual_tokens, "cost": actual_cost},
                "max_output_tokens": agent.max_output_tokens}))
        await self._save_finished(step, StepStatus.COMPLETED, output, None,
                                  attempts, audit, settle=settle)
        elapsed = time.perf_counter() - t0
        self.metrics.observe_step("model", elapsed)
        self.emit({"type": "step.completed", "run_id": step.run_id, "seq": seq, "kind": "model",
                   "name": model_name, "content": response.content,
                   "tool_calls": [c.name for c in response.tool_calls],
                   "ms": round(elapsed * 1000, 2)})
        return response

    @staticmethod
    def _output_audit(agent: Agent, seq: int, response: ModelResponse) -> list[AuditEvent]:
        """``output.invalid``, journaled with the final answer it rejects (replay re-checks
        it to the same verdict, so it is never written twice)."""
        if agent.output_contract is None or response.tool_calls:
            return []
        verdict = typed_output.check(agent.output_contract, response.content)
        if verdict.problem is None:
            return []
        return [AuditEvent(kind="output.invalid", data={
            "step": seq, "agent": agent.name, "message": verdict.problem})]

    @staticmethod
    def _final(agent: Agent, response: ModelResponse, rejected: int) -> typed_output.Verdict:
        """A final answer: the output to finish with, or (a typed agent's answer its schema
        rejects, ``rejected`` of them so far) the problem to correct; out of corrections,
        the run fails ``invalid_output`` with the last one."""
        if agent.output_contract is None:
            return typed_output.Verdict(text=response.content or "")
        verdict = typed_output.check(agent.output_contract, response.content)
        if verdict.problem is not None and rejected >= agent.output_retries:
            raise AlpacaError(ErrorCode.INVALID_OUTPUT, (
                f"agent {agent.name!r} gave no valid output after {rejected} "
                f"correction{'' if rejected == 1 else 's'}: {verdict.problem}"))
        return verdict

    def _price(self, model: str, input_tokens: int, output_tokens: int) -> float:
        return ledger_logic.price_of(model, input_tokens, output_tokens, self.workflow.prices)

    @staticmethod
    def _unreserve(step: StepRecord) -> dict[str, float] | None:
        """A step that consumed nothing gives back what it reserved, except the step itself."""
        if not step.reserved:
            return None
        return {k: -v for k, v in step.reserved.items() if k not in ("steps", "tool_calls")}

    def _count(self, kind: StepKind) -> None:
        self.usage.steps += 1
        if kind == StepKind.TOOL:
            self.usage.tool_calls += 1

    def _count_model(self, response: ModelResponse, cost: float) -> None:
        """A model step's usage; ``cost`` is its price (:meth:`_price`)."""
        self._count(StepKind.MODEL)
        self.usage.input_tokens += response.usage.input_tokens
        self.usage.output_tokens += response.usage.output_tokens
        self.usage.cost = round(self.usage.cost + cost, 9)

    async def _journal(self, write: StepWrite | None = None, *,
                       unless_cancelled: bool = False) -> bool:
        """Write the pending outcomes, then ``write``, in one commit. False: the run has a
        cancel request and ``write`` (``unless_cancelled``: a model turn's start) was not
        made. An outcome's overspend raises BudgetExceeded once it is written, with its
        usage: the overspent ledger stops the tree, and nothing after it is written."""
        writes = [*self._pending, write] if write is not None else self._pending
        if not writes:
            return True
        self._pending = []
        done = await self.store.save_steps(writes, self.epoch, unless_cancelled=unless_cancelled)
        self._seen = done.flags
        return not done.skipped

    async def _save_started(self, step: StepRecord, reserve: dict[str, float] | None,
                            audit: list[AuditEvent], *, unless_cancelled: bool = False) -> bool:
        """Journal ``started`` and reserve the step's budget in one write (with the outcomes
        pending); False: not written, the run has a cancel request (``unless_cancelled``).

        A step that was already started before a crash keeps its reservation (the store never
        debits a step twice), so the record says it resumed instead of claiming a new one."""
        if step.seq in self._interrupted:
            audit = [e for e in audit if e.kind != "budget.reserved"] + [AuditEvent(
                kind="step.resumed", data={"step": step.seq, "idempotency_key":
                                           step.idempotency_key})]
        if not await self._journal(StepWrite(step, audit, reserve=reserve),
                                   unless_cancelled=unless_cancelled):
            return False
        self._open = step
        return True

    async def _save_finished(self, step: StepRecord, status: StepStatus, output: Any,
                             error: dict[str, Any] | None, attempts: int,
                             audit: list[AuditEvent],
                             settle: dict[str, float] | None = None) -> None:
        """The step's outcome, pending until the next journal write (:attr:`_pending`)."""
        step.status, step.output, step.error = status, output, error
        step.attempts, step.finished_at = attempts, self.clock.now()
        self._pending.append(StepWrite(step, audit, settle=settle))
        self._open = None

    # -- tool and delegation steps -------------------------------------------------------------
    async def _tool_step(self, agent: Agent, seq: int, call: ToolCall, journal: Journal,
                         granted: frozenset[str] | None) -> Any:
        target = delegation.target_of(call.name)
        kind = StepKind.DELEGATION if target is not None else StepKind.TOOL
        done = journal.finished(seq, kind)
        if done is not None:
            self._count(StepKind.TOOL)
            return recorded_result(done)
        step = StepRecord(run_id=self.run_record.id, seq=seq, kind=kind, name=call.name,
                          input={"call_id": call.id, "arguments": call.arguments},
                          idempotency_key=idempotency_key(self.run_record.id, seq),
                          started_at=self.clock.now())
        if (prior := journal.get(seq)) is not None:
            step.started_at = prior.started_at
        self.emit({"type": "step.started", "run_id": step.run_id, "seq": seq,
                   "kind": str(kind), "name": call.name, "arguments": call.arguments})
        t0 = time.perf_counter()
        if target is not None:
            with tracing.delegation_span(target, step=seq) as span:
                outcome = await self._delegate(agent, seq, call, step, target)
                if outcome.error:
                    tracing.mark_error(span, outcome.error["code"], outcome.error["message"])
        else:
            with tracing.tool_span(call.name, call_id=call.id, step=seq) as span:
                outcome = await self._gate_and_execute(agent, seq, call, step, granted)
                if outcome.error:
                    tracing.mark_error(span, outcome.error["code"], outcome.error["message"])
                    self.metrics.tool_error(call.name, outcome.error["code"])
        self._count(StepKind.TOOL)
        status = StepStatus.FAILED if outcome.error else StepStatus.COMPLETED
        await self._save_finished(step, status, outcome.result, outcome.error, outcome.attempts,
                                  outcome.audit, settle=outcome.settle)
        elapsed = time.perf_counter() - t0
        self.metrics.observe_step(str(kind), elapsed)
        self.emit({"type": "step.completed", "run_id": step.run_id, "seq": seq,
                   "kind": str(kind), "name": call.name, "arguments": call.arguments,
                   "error": outcome.error, "result": outcome.result,
                   "ms": round(elapsed * 1000, 2)})
        return {"error": outcome.error} if outcome.error else outcome.result

    def _refuse(self, seq: int, name: str, code: ErrorCode, message: str,
                audit: list[AuditEvent] | None = None, **extra: Any) -> _Outcome:
        error = _err(code, message, **extra)
        kind = "gate." + str(code)
        return _Outcome(None, error, 1, [*(audit or []), AuditEvent(kind=kind, data={
            "step": seq, "tool": name, **error})])

    def _parse_args(self, seq: int, call: ToolCall, schema_errors: Any,
                    audit: list[AuditEvent]) -> tuple[dict[str, Any] | None, _Outcome | None]:
        """Gate 3: size, JSON, schema. Returns (args, None) or (None, refusal)."""
        if len(call.arguments.encode()) > self.max_payload_bytes:
            return None, self._refuse(seq, call.name, ErrorCode.PAYLOAD_TOO_LARGE,
                                      f"arguments exceed {self.max_payload_bytes} bytes", audit)
        args, parse_error = parse_arguments(call.arguments)
        if args is not None and "\\u" in call.arguments:
            # JSON escapes can spell what the redacted text could not hold: a lone surrogate
            # ("\\ud800", replaced by U+FFFD) or a secret written as "\\u0073k-...".
            args = redact_value(args, mask_keys=False)
        problems = [parse_error] if parse_error else schema_errors(args or {})
        if problems or args is None:
            return None, self._refuse(seq, call.name, ErrorCode.INVALID_ARGUMENTS,
                                      "; ".join(problems), audit)
        return args, None

    async def _gate_and_execute(
        self, agent: Agent, seq: int, call: ToolCall, step: StepRecord,
        granted: frozenset[str] | None,
    ) -> _Outcome:
        """The gate (DESIGN §2) for one call; ``granted`` is the run's :meth:`capabilities`
        (fixed for the run: worked out once, in :meth:`_loop`)."""
        # 1. lookup
        tool = self.workflow.tools.get(call.name)
        if tool is None:
            return self._refuse(seq, call.name, ErrorCode.UNKNOWN_TOOL,
                                f"no tool named {call.name!r}")
        # 2. permission
        decision = check_tool(tool, agent.tools, granted, self.tenant_policy,
                              declared=agent.capabilities)
        if not decision.allowed:
            return self._refuse(seq, call.name, ErrorCode.PERMISSION_DENIED, decision.rule,
                                rule=decision.rule)
        audit = [AuditEvent(kind="gate.permission_allowed",
                            data={"step": seq, "tool": tool.name, "rule": decision.rule})]
        # 3. input contract
        args, refusal = self._parse_args(seq, call, tool.input_errors, audit)
        if refusal is not None or args is None:
            return refusal or _Outcome(None)
        # 4. budget: reserve with the `started` journal write (input + idempotency key)
        step.input["args"] = args
        reserve = {"steps": 1.0, "tool_calls": 1.0}
        if tool.cost:
            reserve["cost"] = tool.cost
        await self._save_started(step, reserve, [*audit, AuditEvent(
            kind="budget.reserved", data={"step": seq, **reserve})])
        audit = []
        # 5. approval
        reason = agent.approval.reason_for_tool(tool.name, tool.capabilities, tool.cost,
                                                tool.approval == "required")
        if reason is not None:
            gated = await self._approval_gate(agent, seq, "tool", tool.name, args, reason)
            if isinstance(gated, _Outcome):
                return gated
            args = gated
            step.input["args"] = args
        # 6. circuit breaker
        if tool.breaker is not None:
            try:
                allowed, retry_after, moves = await self.breakers.allow(tool.name, tool.breaker)
            except Exception as exc:
                # Breaker state is a health signal, not a permission: when the shared state
                # cannot be read (Redis down) the call goes ahead, and the record says so.
                log.warning("breaker state for %s unavailable, failing open: %s", tool.name, exc)
                allowed, retry_after, moves = True, None, []
                audit.append(AuditEvent(kind="breaker.unavailable", data={
                    "step": seq, "tool": tool.name, "error": _describe(exc)}))
            if not allowed:
                return self._refuse(seq, tool.name, ErrorCode.CIRCUIT_OPEN,
                                    f"circuit for {tool.name!r} is open",
                                    self._breaker_events(moves), retry_after=retry_after)
            audit += self._breaker_events(moves)
        # 7. execute with timeout and retry
        return await self._execute(agent, seq, tool, args, step, audit)

    async def _breaker_record(self, tool: Tool, outcome: Outcome) -> list[AuditEvent]:
        if tool.breaker is None:
            return []
        try:
            moves = await self.breakers.record(tool.name, tool.breaker, outcome)
        except Exception as exc:
            log.warning("could not record %s for the breaker of %s: %s", outcome, tool.name, exc)
            return [AuditEvent(kind="breaker.unavailable", data={
                "tool": tool.name, "outcome": outcome, "error": _describe(exc)})]
        return self._breaker_events(moves)

    async def _execute(self, agent: Agent, seq: int, tool: Tool, args: dict[str, Any],
                       step: StepRecord, audit: list[AuditEvent]) -> _Outcome:
        attempts = 0
        key = step.idempotency_key or idempotency_key(self.run_record.id, seq)

        async def attempt(n: int) -> Any:
            nonlocal attempts
            attempts = n
            ctx = ToolContext(run_id=self.run_record.id, step=seq, idempotency_key=key,
                              attempt=n, agent=agent.name, tenant=self.run_record.tenant)
            # guarded() around the tool's own coroutine: a SystemExit from the tool never
            # reaches the event loop (it would stop the worker serving every other run).
            if tool.timeout is not None:
                return await bounded(guarded(tool.invoke(args, ctx)), tool.timeout)
            return await guarded(tool.invoke(args, ctx))

        async def on_retry(n: int, exc: BaseException, delay: float) -> None:
            step.attempts = n + 1
            self.metrics.retry(tool.name)
            await self._journal(StepWrite(step, [AuditEvent(kind="tool.retry", data={
                "step": seq, "tool": tool.name, "attempt": n, "error": _describe(exc),
                "delay": round(delay, 4)})]))

        try:
            result = await call_with_retry(attempt, tool.retry, clock=self.clock,
                                           is_transient=default_is_transient, on_retry=on_retry)
        except TimeoutError:
            return await self._tool_failed(tool, audit, seq, attempts, _err(
                ErrorCode.TOOL_TIMEOUT, f"tool {tool.name!r} timed out after {tool.timeout}s"))
        except ValidationError as exc:
            return await self._tool_failed(tool, audit, seq, attempts, _err(
                ErrorCode.INVALID_ARGUMENTS, str(exc)), count_failure=False)
        except (LeaseLost, asyncio.CancelledError, Unavailable):
            await asyncio.shield(self._breaker_record(tool, "release"))
            raise
        except Exception as exc:
            # The model gets the type and the redacted, bounded text; the audit keeps the
            # whole (redacted) story, traceback included.
            return await self._tool_failed(tool, audit, seq, attempts,
                                           _err(ErrorCode.TOOL_ERROR, _describe(exc)),
                                           detail=_detail(exc))
        # 8. output contract
        problems, result = self._output_problems(tool, result)
        if problems:
            return await self._tool_failed(tool, audit, seq, attempts, _err(
                ErrorCode.INVALID_OUTPUT, "; ".join(problems)))
        audit += await self._breaker_record(tool, "success")
        audit.append(AuditEvent(kind="tool.result", data={"step": seq, "tool": tool.name,
                                                          "attempts": attempts}))
        return _Outcome(result, None, attempts, audit)

    def _output_problems(self, tool: Tool, result: Any) -> tuple[list[str], Any]:
        """Gate 8 and the one redaction of the result (the journal and the model get the
        same value). A result that cannot even be encoded is the tool's failure too."""
        if nesting_exceeds(result):
            return [too_deep_message("the result's arrays/objects")], None
        try:
            try:
                problems = tool.output_errors(result)
            except UnicodeEncodeError:  # lone surrogates: validate the text we would keep
                problems = tool.output_errors(redact_value(result, mask_keys=False))
            if not problems and payload_size(result) > self.max_payload_bytes:
                problems = [f"result exceeds {self.max_payload_bytes} bytes"]
            return problems, (None if problems else redact_value(result))
        except Exception as exc:
            return [f"the result cannot be encoded as JSON ({_describe(exc)})"], None

    async def _tool_failed(self, tool: Tool, audit: list[AuditEvent], seq: int, attempts: int,
                           error: dict[str, Any], count_failure: bool = True,
                           detail: dict[str, Any] | None = None) -> _Outcome:
        audit = audit + await self._breaker_record(
            tool, "failure" if count_failure else "release")
        audit.append(AuditEvent(kind="tool.failed", data={"step": seq, "tool": tool.name,
                                                          "attempts": attempts, **error,
                                                          **(detail or {})}))
        return _Outcome(None, error, max(attempts, 1), audit)

    def _breaker_events(self, moves: list[Transition]) -> list[AuditEvent]:
        events = []
        for t in moves:
            self.metrics.breaker_transition(t.tool, str(t.to_state))
            events.append(AuditEvent(kind="breaker.transition", data={
                "tool": t.tool, "from": str(t.from_state), "to": str(t.to_state),
                "reason": t.reason}))
        return events

    # -- approvals -----------------------------------------------------------------------------
    async def _approval_gate(self, agent: Agent, seq: int, kind: str, action: str,
                             args: dict[str, Any], reason: str) -> dict[str, Any] | _Outcome:
        """Gate 5: the approved arguments, a refusal for the model, or a pause."""
        await self._journal()
        run = self.run_record
        approval = await self.store.get_step_approval(run.id, seq)
        if approval is None:
            now = self.clock.now()
            policy = agent.approval
            approval = ApprovalRecord(
                id=f"apr_{uuid.uuid4().hex[:16]}", tenant=run.tenant, run_id=run.id,
                root_id=run.root_id, step=seq, kind=kind, action=action, arguments=args,
                reason=reason, requested_by=f"agent:{agent.name}", created_at=now,
                expires_at=now + policy.expires_after if policy.expires_after else None,
                on_reject=policy.on_reject, on_expiry=policy.on_expiry)
            approval = await self.store.create_approval(approval, self.epoch, [AuditEvent(
                kind="approval.requested", actor=f"agent:{agent.name}", data={
                    "approval_id": approval.id, "step": seq, "action": action,
                    "arguments": args, "reason": reason,
                    "expires_at": approval.expires_at})])
            self.emit({"type": "approval.requested", "run_id": run.id, "seq": seq,
                       "approval_id": approval.id, "action": action, "arguments": args,
                       "reason": reason})
        if approval.status == ApprovalStatus.PENDING:
            raise _Wait(f"approval {approval.id} pending for {action}")
        if approval.status == ApprovalStatus.APPROVED or (
                approval.status == ApprovalStatus.EXPIRED and approval.on_expiry == "approve"):
            return dict(approval.arguments)
        if approval.status == ApprovalStatus.EXPIRED:
            raise AlpacaError(ErrorCode.APPROVAL_EXPIRED,
                              f"approval {approval.id} for {action} expired (policy: deny)")
        message = f"{action} was rejected by {approval.decided_by}"
        if approval.comment:
            message += f": {approval.comment}"
        if approval.on_reject == "fail":
            raise AlpacaError(ErrorCode.APPROVAL_REJECTED, message)
        return self._refuse(seq, action, ErrorCode.APPROVAL_REJECTED, message,
                            approval_id=approval.id, decided_by=approval.decided_by)

    # -- delegation ----------------------------------------------------------------------------
    async def _delegate(self, agent: Agent, seq: int, call: ToolCall, step: StepRecord,
                        target: str) -> _Outcome:
        self.delegated = True
        run = self.run_record
        child_agent = self.workflow.agents.get(target)
        problem = delegation.refusal(run, agent, target, self.workflow.max_depth,
                                     child_agent is not None)
        if problem is not None:
            return self._refuse(seq, call.name, problem[0], problem[1], target=target)
        assert child_agent is not None
        args, refusal = self._parse_args(
            seq, call, lambda a: [] if isinstance(a.get("task"), str) and a["task"] and
            set(a) == {"task"} else ["expected exactly {\"task\": \"<non-empty string>\"}"], [])
        if refusal is not None or args is None:
            return refusal or _Outcome(None)
        step.input["args"] = args
        step.input["child_id"] = delegation.child_id(run.id, seq)
        # Audited once: a step journaled before this run paused (or crashed) was allowed then.
        allowed = [] if seq in self._interrupted else [AuditEvent(
            kind="delegation.allowed", data={"step": seq, "target": target,
                                             "ancestry": [*run.ancestry, target],
                                             "depth": run.depth + 1})]
        await self._save_started(step, {"steps": 1.0}, allowed)
        reason = agent.approval.reason_for_delegation(target)
        if reason is not None:
            gated = await self._approval_gate(agent, seq, "delegation", target, args, reason)
            if isinstance(gated, _Outcome):
                return gated
            args = gated
        child = await self._child(agent, child_agent, seq, args["task"])
        if not child.state.terminal:
            raise _Wait(f"waiting for child run {child.id} ({target})", child_id=child.id)
        audit = [AuditEvent(kind="delegation.finished", data={
            "step": seq, "child_id": child.id, "state": str(child.state)})]
        if child.state == RunState.SUCCEEDED:
            return _Outcome({"agent": target, "run_id": child.id, "output": child.value},
                            None, 1, audit)
        return _Outcome(None, _err(ErrorCode(child.error_code or "internal_error"),
                                   f"sub-agent {target} {child.state}: {child.error_message}",
                                   run_id=child.id), 1, audit)

    async def _child(self, agent: Agent, child_agent: Agent, seq: int, task: str) -> RunRecord:
        await self._journal()
        run = self.run_record
        cid = delegation.child_id(run.id, seq)
        try:
            return await self.store.get_run(cid)
        except NotFound:
            pass
        ledgers = list(run.ledgers)
        ledger = None
        wanted = ledger_logic.limits_from_budget(child_agent.budget)
        if wanted:
            parent_ledgers = [await self.store.get_ledger(lid) for lid in run.ledgers]
            limits = dict(wanted)
            for pl in parent_ledgers:
                limits = ledger_logic.sub_limits(ledger_logic.LedgerState(
                    id=pl.id, limits=pl.limits, used=pl.used), limits)
            ledger = LedgerRecord(id=cid, limits=limits)
            ledgers.append(cid)
        record = delegation.child_run(run, self.capabilities(agent), child_agent, task, seq,
                                      self.clock.now(), ledgers, tracing.current_traceparent())
        created, _ = await self.store.create_run(record, [AuditEvent(
            kind="run.created", actor=f"agent:{agent.name}", data={
                "agent": child_agent.name, "parent_id": run.id, "depth": record.depth,
                "ancestry": record.ancestry, "capabilities": record.capabilities,
                "ledger_limits": ledger.limits if ledger else None})], ledger=ledger)
        self.emit({"type": "delegation.started", "run_id": run.id, "seq": seq,
                   "child_id": created.id, "agent": child_agent.name})
        if self.on_queued is not None and created.state == RunState.QUEUED:
            await self.on_queued(created.id)
        return created

    # -- ending --------------------------------------------------------------------------------
    async def _pause(self, wait: _Wait) -> RunRecord:
        writes, self._pending = self._pending, []
        record = await self.store.transition(
            self.run_record.id, RunState.WAITING, self.clock.now(), epoch=self.epoch,
            usage=self.usage.as_dict(), audit=[AuditEvent(kind="run.paused",
                                                          data={"reason": wait.reason})],
            steps=writes)
        self.run_record = record
        self.emit({"type": "run.waiting", "run_id": record.id, "reason": wait.reason})
        if wait.child_id is not None:
            # The child may have finished before we paused: nobody else would wake us then.
            child = await self.store.get_run(wait.child_id)
            if child.state.terminal:
                woke = await wake(self.store, record, self.clock.now(), "child finished")
                record = self.run_record = await self.store.get_run(record.id)
                if woke and self.on_queued is not None:
                    await self.on_queued(record.id)
        return record

    async def _finish(self, state: RunState, *, output: str | None = None,
                      output_type: str | None = None,
                      error: AlpacaError | None = None) -> RunRecord:
        # ``output`` is the redacted model answer; error text may quote anything: redact it.
        # The outcomes pending go in the same commit; one that raises (an overspend) keeps
        # the run going to _fail, as a journal write would.
        writes, self._pending = self._pending, []
        record = await self.store.transition(
            self.run_record.id, state, self.clock.now(), epoch=self.epoch, output=output,
            output_type=output_type,
            error_code=str(error.code) if error else None,
            error_message=redact_text(error.message) if error else None,
            usage=self.usage.as_dict(), steps=writes)
        self.run_record = record
        self.emit({"type": "run.finished", "run_id": record.id, "state": str(record.state),
                   "output": record.value, "output_type": record.output_type,
                   "error_code": record.error_code, "error_message": record.error_message,
                   "usage": record.usage})
        return record

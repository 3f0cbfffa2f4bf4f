"""The ``/v1`` routes, health checks and metrics (DESIGN §9).

Every lookup passes the caller's tenant to the store, so another tenant's id is simply not
found (404): the API never confirms that someone else's run exists.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sse_starlette import EventSourceResponse
from starlette.responses import PlainTextResponse

from ..errors import NotFound
from ..faults import Unavailable
from ..lifecycle import RunState
from ..store.base import Store
from ..store.records import ApprovalStatus, RunRecord
from ..telemetry.metrics import METRICS
from ..verification import verify_run
from ..workflow import Workflow
from ..workflows.registry import names_same_request
from . import events
from .auth import Principal, Role, require
from .models import (
    SEQ_MAX,
    AgentInfo,
    AgentList,
    Approval,
    ApprovalList,
    AuditEntry,
    AuditList,
    AuditVerification,
    Breaker,
    BreakerList,
    CancelResult,
    Decision,
    Health,
    Readiness,
    Run,
    RunCreate,
    RunList,
    Step,
    StepList,
    ToolInfo,
    ToolList,
)
from .problems import Problem, ProblemError
from .state import ApiState, Waker, get_state
from .workflow_names import run_workflow

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer alp_...`")

WAIT_POLL_SECONDS = 0.25


async def principal(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return await get_state(request).auth.authenticate(request)


State = Annotated[ApiState, Depends(get_state)]
Caller = Annotated[Principal, Depends(principal)]


def no_nul(value: str, what: str) -> str:
    """Ids never hold NUL, and PostgreSQL cannot even compare one: answer 404 up front."""
    if "\x00" in value:
        raise NotFound(f"{what} {value!r} not found")
    return value


def _run_id(run_id: Annotated[str, PathParam(description="A run id (`run_...`).")]) -> str:
    return no_nul(run_id, "run")


def _approval_id(approval_id: Annotated[str, PathParam(description="An approval id.")]
                 ) -> str:
    return no_nul(approval_id, "approval")


RunId = Annotated[str, Depends(_run_id)]
ApprovalId = Annotated[str, Depends(_approval_id)]
IdFilter = Annotated[str | None, Query(pattern=r"^[^\x00]*$", max_length=200,
                                       description="Only those of this id.")]


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Problem responses a route documents (every route can also answer 400/413/500/503)."""
    described = {400: "Malformed request", 401: "Missing or invalid API key",
                 403: "The key's role does not allow this", 404: "Not found (or another "
                 "tenant's)", 409: "Conflict with the current state", 413: "Body too large",
                 422: "Invalid input", 500: "Server error",
                 503: "The store or Redis is unusable (down, full, read-only); retry later"}
    wanted = sorted({400, 413, 422, 500, 503, *codes})
    return {c: {"model": Problem, "description": described[c]} for c in wanted}


AUTHED = (401, 403)
Wait = Annotated[bool, Query(description="Block until the run tree is terminal or waits for "
                                        "an approval.")]
WaitSeconds = Annotated[float, Query(alias="timeout", ge=0, le=300,
                                     description="Most seconds to wait.")]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                              max_length=255)]

runs = APIRouter(prefix="/v1", tags=["runs"])
approvals = APIRouter(prefix="/v1", tags=["approvals"])
catalog = APIRouter(prefix="/v1", tags=["catalog"])
ops = APIRouter(tags=["operations"])


# ------------------------------------------------------------------------------------- runs


@runs.post("/runs", status_code=201, response_model=Run,
           responses={200: {"model": Run, "description": "An earlier request with the same "
                            "Idempotency-Key created this run"},
                      **errors(*AUTHED, 409)})
async def create_run(
    body: RunCreate,
    response: Response,
    st: State,
    who: Caller,
    wait: Wait = False,
    wait_seconds: WaitSeconds = 30.0,
    idempotency_key: IdempotencyKey = None,
) -> Run:
    """Start a run of an agent of a registered (pinned to its version) or served workflow."""
    require(who, Role.USER)
    workflow = await run_workflow(st, who.tenant, body.workflow)
    check_agent(workflow, body.agent)
    budget = body.budget.model_dump(exclude_none=True) if body.budget else None
    record, created = await st.engine.submit_run(
        workflow, body.agent, body.input, tenant=who.tenant, idempotency_key=idempotency_key,
        budget=budget)
    if not created and not await same_request(st.store, record, body.agent, body.input,
                                              body.workflow, workflow.ref, budget or {}):
        raise ProblemError(409, "idempotency_key_reused",
                           f"Idempotency-Key {idempotency_key!r} was used for run {record.id} "
                           "with a different agent, input, workflow or budget")
    if wait:
        record = await wait_settled(st, record.id, who.tenant, wait_seconds)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/runs/{record.id}"
    return Run.of(record)


def check_agent(workflow: Workflow, agent: str) -> None:
    """422 ``unknown_agent`` naming the agents there are."""
    if agent not in workflow.agents:
        known = ", ".join(sorted(workflow.agents))
        raise ProblemError(422, "unknown_agent",
                           f"agent {agent!r} is not in {workflow.ref} (known: {known})")


async def same_request(store: Store, run: RunRecord, agent: str, input: str,
                       workflow: str | None, resolved: str, budget: dict[str, Any]) -> bool:
    """Whether a replayed Idempotency-Key carries the body that created ``run``. The budget
    is compared as requested (kept in the ``run.created`` audit record), not as merged with
    the workflow's defaults, so ``{}`` and an explicit default differ like any other body."""
    if (run.agent, run.input) != (agent, input) or not names_same_request(
            run.workflow, workflow, resolved):
        return False
    created = next((r for r in await store.list_audit(run.id) if r.kind == "run.created"), None)
    if created is None or "requested_budget" not in created.data:
        # Runs created before the request budget was recorded: compare the merged budget.
        return {k: v for k, v in run.budget.items() if k != "deadline"} == {
            k: v for k, v in {**run.budget, **budget}.items() if k != "deadline"}
    return bool(created.data["requested_budget"] == budget)


async def settled(store: Store, run: RunRecord) -> bool:
    """Terminal, or waiting with nothing left to run but a pending approval in the tree."""
    if run.state.terminal:
        return True
    if run.state != RunState.WAITING:
        return False
    tree = await store.list_runs(root_id=run.root_id, limit=10_000)
    if any(r.state in (RunState.QUEUED, RunState.RUNNING) for r in tree):
        return False
    for r in tree:
        if r.state == RunState.WAITING and await store.list_approvals(
                run_id=r.id, status=ApprovalStatus.PENDING, limit=1):
            return True
    return False


async def wait_settled(st: ApiState, run_id: str, tenant: str, seconds: float) -> RunRecord:
    deadline = time.monotonic() + seconds
    async with Waker(st.engine, run_id) as waker:
        while True:
            run = await st.store.get_run(run_id, tenant)
            left = deadline - time.monotonic()
            if left <= 0 or await settled(st.store, run):
                return run
            await waker.wait(min(WAIT_POLL_SECONDS, left))


@runs.get("/runs", response_model=RunList, responses=errors(*AUTHED))
async def list_runs(
    st: State,
    who: Caller,
    state: RunState | None = None,
    agent: Annotated[str | None, Query(max_length=200)] = None,
    root_id: IdFilter = None,
    parent_id: IdFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> RunList:
    """The tenant's runs, newest first."""
    require(who, Role.USER)
    found = await st.store.list_runs(tenant=who.tenant, state=state, root_id=root_id,
                                     parent_id=parent_id,
                                     limit=limit if agent is None else 100_000)
    if agent is not None:
        found = [r for r in found if r.agent == agent][:limit]
    return RunList(items=[Run.of(r) for r in found])


@runs.get("/runs/{run_id}", response_model=Run, responses=errors(*AUTHED, 404))
async def get_run(run_id: RunId, st: State, who: Caller) -> Run:
    require(who, Role.USER)
    return Run.of(await st.store.get_run(run_id, who.tenant))


@runs.get("/runs/{run_id}/steps", response_model=StepList, responses=errors(*AUTHED, 404))
async def list_steps(run_id: RunId, st: State, who: Caller) -> StepList:
    """The run's journal: one entry per model call, tool call, delegation or approval."""
    require(who, Role.USER)
    await st.store.get_run(run_id, who.tenant)
    steps = await st.store.list_steps(run_id)
    return StepList(items=[Step.model_validate(s.model_dump()) for s in steps])


@runs.post("/runs/{run_id}/cancel", response_model=CancelResult,
           responses=errors(*AUTHED, 404))
async def cancel_run(run_id: RunId, st: State, who: Caller) -> CancelResult:
    """Cancel the run and its whole subtree; running runs stop at their next step."""
    require(who, Role.USER)
    affected = await st.engine.cancel(run_id, who.tenant)
    for r in affected:
        await st.publish(r.id, {"type": "run.cancel"})
    run = await st.store.get_run(run_id, who.tenant)
    return CancelResult(run=Run.of(run), affected=[Run.of(r) for r in affected])


@runs.get("/runs/{run_id}/events", response_class=EventSourceResponse,
          responses={200: {"description": "Server-Sent Events (see the README's Events): "
                           "one `message` event per audit record, then `end`."},
                     204: {"description": "The stream is finished and the position sent "
                           "(Last-Event-ID or ?after=) is at or past its end: nothing more "
                           "will come (this stops an EventSource)."},
                     **errors(*AUTHED, 404)})
async def run_events(
    run_id: RunId,
    st: State,
    who: Caller,
    after: Annotated[int | None, Query(ge=0, le=events.INT64_MAX, description=(
        "Start after this seq of the run (one run's stream only); Last-Event-ID wins."))] = None,
    tree: Annotated[bool, Query(description=(
        "Stream the run and every run below it (its delegations, recursively); each event "
        "names its run, and its id is a tree cursor."))] = False,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=events.MAX_CURSOR_CHARS, description=(
            "The id of the last event received (EventSource sends it when it reconnects): "
            "a seq, or a tree cursor on a tree stream."))] = None,
) -> Response:
    """Stream the run's audit records live; reconnect with Last-Event-ID to resume."""
    require(who, Role.USER)
    await st.store.get_run(run_id, who.tenant)
    scope = events.Scope(run_id, tree=tree)
    cursor = events.start_position(scope, last_event_id, after)
    if await events.nothing_left(st.store, scope, cursor):
        return Response(status_code=204)
    return EventSourceResponse(events.stream(st, scope, cursor), ping=15,
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@runs.get("/runs/{run_id}/audit", response_model=AuditList, responses=errors(*AUTHED, 404))
async def run_audit(
    run_id: RunId, st: State, who: Caller,
    after: Annotated[int, Query(ge=0, le=SEQ_MAX,
                                description="Only records after this seq.")] = 0,
) -> AuditList:
    """The run's hash-chained audit records, in order."""
    require(who, Role.USER)
    await st.store.get_run(run_id, who.tenant)
    return AuditList(items=[AuditEntry.of(r) for r in await st.store.list_audit(run_id, after)])


@runs.get("/runs/{run_id}/audit/verify", response_model=AuditVerification,
          responses=errors(*AUTHED, 404))
async def verify_audit(run_id: RunId, st: State, who: Caller) -> AuditVerification:
    """Recompute the run's hash chain and name the first bad record, if any."""
    require(who, Role.USER)
    checked = await verify_run(st.store, await st.store.get_run(run_id, who.tenant),
                               st.settings.audit_key_bytes())
    result = checked.result
    anchor = checked.anchor
    return AuditVerification(ok=result.ok, records=result.count, head_seq=checked.head_seq,
                             first_bad_seq=result.first_bad_seq, reason=result.reason,
                             deleted_with=anchor.thread_id if anchor else None,
                             anchor_seq=anchor.seq if anchor else None)


# -------------------------------------------------------------------------------- approvals


@approvals.get("/approvals", response_model=ApprovalList, responses=errors(*AUTHED))
async def list_approvals(
    st: State,
    who: Caller,
    status: Literal["pending", "approved", "rejected", "expired", "all"] = "pending",
    run_id: IdFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ApprovalList:
    """The tenant's approvals (pending ones unless ``status`` says otherwise)."""
    require(who, Role.USER)
    found = await st.store.list_approvals(
        tenant=who.tenant, status=None if status == "all" else ApprovalStatus(status),
        run_id=run_id, limit=limit)
    return ApprovalList(items=[Approval.of(a) for a in found])


@approvals.post("/approvals/{approval_id}/decision", response_model=Approval,
                responses=errors(*AUTHED, 404, 409))
async def decide(approval_id: ApprovalId, body: Decision, st: State, who: Caller) -> Approval:
    """Approve or reject a pending action (supervisor or admin); the run continues."""
    require(who, Role.SUPERVISOR)
    decided = await st.store.decide_approval(
        approval_id, approve=body.decision == "approve", by=who.label, comment=body.comment,
        now=st.engine.clock.now(), tenant=who.tenant)
    await st.engine.dispatch(decided.run_id)
    await st.publish(decided.run_id, {"type": "approval.decided",
                                      "approval_id": decided.id})
    return Approval.of(decided)


# ---------------------------------------------------------------------------------- catalog


@catalog.get("/agents", response_model=AgentList, responses=errors(*AUTHED))
async def list_agents(st: State, who: Caller) -> AgentList:
    """The agents of the served workflows."""
    require(who, Role.USER)
    return AgentList(items=[AgentInfo.model_validate({"workflow": wf.ref, **agent.describe()})
                            for wf in st.served.workflows for agent in wf.agents.values()])


@catalog.get("/tools", response_model=ToolList, responses=errors(*AUTHED))
async def list_tools(st: State, who: Caller) -> ToolList:
    """The tools of the served workflows, then the rest of the server's tool catalog
    (``workflow: catalog``). A registered workflow names a Python tool by its ``python``
    path."""
    require(who, Role.USER)
    items = [ToolInfo.model_validate({"workflow": wf.ref, **tool.describe(),
                                      "python": _path_of(wf, tool.name)})
             for wf in st.served.workflows for tool in wf.tools]
    listed = {item.python for item in items}
    items += [ToolInfo.model_validate({"workflow": "catalog", **tool.describe(), "python": path})
              for path, tool in st.engine.registry.catalog.tools.items() if path not in listed]
    return ToolList(items=items)


def _path_of(workflow: Workflow, tool: str) -> str | None:
    return next((p for p, name in workflow.python_paths.items() if name == tool), None)


@catalog.get("/breakers", response_model=BreakerList, responses=errors(*AUTHED))
async def list_breakers(st: State, who: Caller) -> BreakerList:
    """Circuit breakers seen by this deployment (shared through Redis when configured)."""
    require(who, Role.USER)
    snapshots = await st.engine.breakers.snapshots()
    return BreakerList(items=[Breaker.model_validate({"tool": name, **snap.to_dict()})
                              for name, snap in sorted(snapshots.items())])


# ------------------------------------------------------------------------------- operations


@ops.get("/healthz", response_model=Health, responses=errors())
async def healthz() -> Health:
    """The process is up (no dependency is checked)."""
    return Health()


@ops.get("/readyz", response_model=Readiness, responses=errors(503))
async def readyz(st: State) -> Readiness:
    """The store answers and no request hit a store fault (a full disk, a database that went
    away) in the last seconds; a load balancer should send traffic only then."""
    try:
        await asyncio.wait_for(st.store.list_runs(limit=1), st.settings.connect_timeout + 1)
    except TimeoutError:
        raise ProblemError(503, "store_unavailable", "the store did not answer within "
                           f"{st.settings.connect_timeout + 1:g} s") from None
    except Unavailable:
        raise  # 503 naming the fault and its fix (api/problems.py)
    except Exception as exc:
        raise ProblemError(503, "unavailable", f"the store is not usable: {exc}") from None
    recent = st.faults.recent()
    if recent is not None:
        ago, fault = recent
        raise ProblemError(503, str(fault.code), f"{fault.public} (a request failed on it "
                           f"{ago:.0f} s ago)", fault=str(fault.fault))
    return Readiness(store=st.settings.database_url.split(":", 1)[0])


@ops.get("/metrics", response_class=PlainTextResponse,
         responses={200: {"description": "Prometheus text exposition format",
                          "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **errors(*AUTHED)})
async def metrics(st: State, who: Caller) -> Response:
    """Prometheus metrics (admin only when API keys are in use)."""
    require(who, Role.ADMIN)
    await st.metrics.refresh()
    body, content_type = METRICS.render()
    return Response(content=body, media_type=content_type)

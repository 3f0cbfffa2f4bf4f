"""``/v1/threads``: conversations with an agent, one run per message (DESIGN §10).

Every lookup passes the caller's tenant, so another tenant's thread answers 404 on every
route, as a deleted thread does. A message while the thread's last turn is queued, running
or waiting answers 409 ``turn_in_progress`` naming that turn's run: turns run strictly one
after the other (the store decides it atomically).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi import Path as PathParam
from sse_starlette import EventSourceResponse

from ..errors import TurnInProgress
from ..forks import ForkPastEnd
from ..threads import ThreadWorkflowGone
from . import events
from .auth import Role, require
from .models import Run
from .models_threads import (
    ForkRequest,
    MessageCreate,
    Thread,
    ThreadCreate,
    ThreadDeleted,
    ThreadList,
    ThreadMessage,
    ThreadMessageList,
)
from .problems import ProblemError
from .routes import (
    AUTHED,
    Caller,
    IdempotencyKey,
    State,
    Wait,
    WaitSeconds,
    check_agent,
    errors,
    no_nul,
    same_request,
    wait_settled,
)
from .workflow_names import run_workflow

threads = APIRouter(prefix="/v1", tags=["threads"])


def _thread_id(thread_id: Annotated[str, PathParam(description="A thread id (`thr_...`).")]
               ) -> str:
    return no_nul(thread_id, "thread")


ThreadId = Annotated[str, Depends(_thread_id)]


@contextmanager
def _turn_conflicts() -> Iterator[None]:
    """A thread whose last turn is unfinished: 409 naming the turn's run."""
    try:
        yield
    except TurnInProgress as exc:
        raise ProblemError(409, "turn_in_progress", str(exc), run_id=exc.run_id,
                           turn=exc.turn) from None


@threads.post("/threads", status_code=201, response_model=Thread,
              responses=errors(*AUTHED))
async def create_thread(body: ThreadCreate, response: Response, st: State,
                        who: Caller) -> Thread:
    """Start a conversation with an agent of a registered (pinned to its version) or served
    workflow; each message then runs one turn."""
    require(who, Role.USER)
    workflow = await run_workflow(st, who.tenant, body.workflow)
    check_agent(workflow, body.agent)
    thread = await st.engine.create_thread(
        agent=body.agent, workflow=workflow, tenant=who.tenant, title=body.title,
        metadata=body.metadata,
        budget=body.budget.model_dump(exclude_none=True) if body.budget else None)
    response.headers["Location"] = f"/v1/threads/{thread.id}"
    return Thread.of(thread)


@threads.get("/threads", response_model=ThreadList, responses=errors(*AUTHED))
async def list_threads(st: State, who: Caller,
                       limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> ThreadList:
    """The tenant's threads, most recently active first (deleted ones are gone)."""
    require(who, Role.USER)
    return ThreadList(items=[Thread.of(t) for t in
                             await st.store.list_threads(tenant=who.tenant, limit=limit)])


@threads.get("/threads/{thread_id}", response_model=Thread, responses=errors(*AUTHED, 404))
async def get_thread(thread_id: ThreadId, st: State, who: Caller) -> Thread:
    require(who, Role.USER)
    return Thread.of(await st.store.get_thread(thread_id, who.tenant))


@threads.delete("/threads/{thread_id}", response_model=ThreadDeleted,
                responses=errors(*AUTHED, 404, 409))
async def delete_thread(thread_id: ThreadId, st: State, who: Caller) -> ThreadDeleted:
    """Erase the thread's content (messages, answers, steps, audit records, approval
    arguments of every turn and its delegated runs). The audit stays verifiable: the
    thread's own chain records each erased run's chain head, and verifying such a run
    answers "deleted, anchored". 409 while a turn is unfinished (cancel it first)."""
    require(who, Role.USER)
    with _turn_conflicts():
        gone = await st.engine.delete_thread(thread_id, tenant=who.tenant,
                                             actor=f"user:{who.label}")
    await st.publish(gone.id, {"type": "thread.deleted", "thread_id": gone.id})
    return ThreadDeleted.of(gone, (await st.store.list_thread_audit(gone.id))[-1])


@threads.post("/threads/{thread_id}/messages", status_code=201, response_model=Run,
              responses={200: {"model": Run, "description": "An earlier request with the "
                               "same Idempotency-Key created this turn"},
                         **errors(*AUTHED, 404, 409)})
async def post_message(
    thread_id: ThreadId,
    body: MessageCreate,
    response: Response,
    st: State,
    who: Caller,
    wait: Wait = False,
    wait_seconds: WaitSeconds = 30.0,
    idempotency_key: IdempotencyKey = None,
) -> Run:
    """Send the user's next message: it starts the next turn (a run of the thread's agent,
    sent the earlier turns as history). 409 `turn_in_progress` while the last turn is
    queued, running or waiting."""
    require(who, Role.USER)
    thread = await st.store.get_thread(thread_id, who.tenant)
    budget = body.budget.model_dump(exclude_none=True) if body.budget else None
    with _turn_conflicts():
        try:
            record, created = await st.engine.send_message(
                thread.id, body.content, tenant=who.tenant, budget=budget,
                idempotency_key=idempotency_key)
        except ThreadWorkflowGone as exc:
            raise ProblemError(422, "workflow_error", str(exc)) from None
    if not created and not (record.thread_id == thread.id and await same_request(
            st.store, record, thread.agent, body.content, thread.workflow, thread.workflow,
            budget or {})):
        raise ProblemError(409, "idempotency_key_reused",
                           f"Idempotency-Key {idempotency_key!r} was used for run {record.id} "
                           "with a different thread, content or budget")
    if created:
        await st.publish(record.id, {"type": "thread.turn", "thread_id": thread.id,
                                     "turn": record.turn})
    if wait:
        record = await wait_settled(st, record.id, who.tenant, wait_seconds)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/runs/{record.id}"
    return Run.of(record)


@threads.get("/threads/{thread_id}/messages", response_model=ThreadMessageList,
             responses=errors(*AUTHED, 404))
async def list_messages(thread_id: ThreadId, st: State, who: Caller) -> ThreadMessageList:
    """The turns in order: the user's message, the answer, the run and its state."""
    require(who, Role.USER)
    thread = await st.store.get_thread(thread_id, who.tenant)
    return ThreadMessageList(items=[ThreadMessage.of(r)
                                    for r in await st.store.list_turns(thread.id)])


@threads.get("/threads/{thread_id}/events", response_class=EventSourceResponse,
             responses={200: {"description": "Server-Sent Events (see the README's Threads): "
                              "every turn's audit records, model deltas and `turn.end`; the "
                              "stream stays open for the next turn and ends after "
                              "`thread.deleted`."},
                        **errors(*AUTHED, 404)})
async def thread_events(
    thread_id: ThreadId,
    st: State,
    who: Caller,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=events.MAX_CURSOR_CHARS, description=(
            "The id of the last event received (a thread cursor): resume after it."))] = None,
) -> Response:
    """Stream the thread live, every turn in order; reconnect with Last-Event-ID."""
    require(who, Role.USER)
    thread = await st.store.get_thread(thread_id, who.tenant)
    last_turn = max((t.turn or 0 for t in await st.store.list_turns(thread.id)), default=0)
    cursor = events.parse_thread_cursor(last_event_id, last_turn) if last_event_id else {}
    return EventSourceResponse(events.thread_stream(st, thread.id, who.tenant, cursor),
                               ping=15, headers={"Cache-Control": "no-cache",
                                                 "X-Accel-Buffering": "no"})


@threads.post("/threads/{thread_id}/fork", status_code=201, response_model=Thread,
              responses=errors(*AUTHED, 404, 409))
async def fork_thread(thread_id: ThreadId, body: ForkRequest, response: Response, st: State,
                      who: Caller) -> Thread:
    """A new thread sharing the first `turn` turns (copied with their journals: replayed as
    history, their tools never run again); it outlives the source's deletion. 422 past the
    last turn."""
    require(who, Role.USER)
    try:
        with _turn_conflicts():
            fork = await st.engine.fork_thread(thread_id, body.turn,
                                               tenant=who.tenant)
    except ForkPastEnd as exc:
        raise ProblemError(422, "turn_out_of_range", str(exc)) from None
    response.headers["Location"] = f"/v1/threads/{fork.id}"
    return Thread.of(fork)

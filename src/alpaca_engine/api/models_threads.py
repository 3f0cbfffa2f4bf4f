"""Request and response bodies of ``/v1/threads`` (DESIGN §10), and their stream events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..lifecycle import RunState
from ..store.records import RunRecord, ThreadRecord
from ..telemetry.audit import AuditRecord
from .models import MAX_INPUT_CHARS, AuditEntry, Budget, MessageDeltaEvent, Text

MAX_METADATA_BYTES = 16 * 1024
"""A thread's metadata, as JSON, is at most this long (it is shown in every listing)."""


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the message is empty; send some text")
    return text


def _texts(value: Any) -> Iterator[str]:
    """Every key and string of a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _texts(v)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)


def _small_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Storable on every store (as ``Text`` is) and small."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ValueError("metadata holds a lone UTF-16 surrogate (not valid Unicode); send "
                         "well-formed text") from None
    if any("\x00" in t for t in _texts(value)):
        raise ValueError("metadata holds a NUL character (U+0000), which the engine does not "
                         "store; remove it")
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
    return value


Content = Annotated[Text, Field(min_length=1, max_length=MAX_INPUT_CHARS),
                    AfterValidator(_not_blank)]


class ThreadBudget(BaseModel):
    """Limits for the whole thread, across its turns (each turn keeps its run tree's own
    budget too). Strict, like a run's budget."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    max_tool_calls: int | None = Field(default=None, ge=0, le=10_000_000)
    max_tokens: int | None = Field(default=None, ge=0, le=10**13)
    max_cost: float | None = Field(default=None, ge=0, le=10**10)


class ThreadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: Text = Field(min_length=1, max_length=200)
    workflow: Text | None = Field(
        default=None, max_length=4096,
        description="As for `POST /v1/runs`: a registered workflow (`NAME`, pinned to its "
                    "latest version now, or `NAME@VERSION`) or a served one; default: the "
                    "first served one. Every turn runs on the version pinned here.")
    title: Text = Field(default="", max_length=200)
    metadata: Annotated[dict[str, Any], AfterValidator(_small_metadata)] = Field(
        default_factory=dict, description=f"Free JSON for the client (at most "
                                          f"{MAX_METADATA_BYTES} bytes).")
    budget: ThreadBudget | None = None


class Thread(BaseModel):
    id: str
    tenant: str
    agent: str
    workflow: str = Field(description="The ref every turn runs on (`registry:NAME@V` for a "
                                      "registered workflow).")
    workflow_version: int | None
    title: str
    metadata: dict[str, Any]
    budget: dict[str, Any]
    forked_from: str | None
    forked_turn: int | None
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, record: ThreadRecord) -> Thread:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class ThreadList(BaseModel):
    items: list[Thread]


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: Content = Field(description=f"The user's message (1 to {MAX_INPUT_CHARS} "
                                         "characters, not only white space).")
    budget: Budget | None = Field(default=None, description="This turn's run tree budget.")


class ThreadMessage(BaseModel):
    """One turn: the user's message, the agent's answer, and the run that made it."""

    turn: int
    run_id: str
    state: RunState
    content: str
    answer: Any = Field(description="The final answer: text, or the JSON value of a typed "
                                    "agent (see `output_type`); null until the turn ends.")
    output_type: Literal["text", "json"] = "text"
    error_code: str | None
    error_message: str | None
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, run: RunRecord) -> ThreadMessage:
        return cls(turn=run.turn or 0, run_id=run.id, state=run.state, content=run.input,
                   answer=run.value, output_type=run.output_type, error_code=run.error_code,
                   error_message=run.error_message, created_at=run.created_at,
                   updated_at=run.updated_at)


class ThreadMessageList(BaseModel):
    items: list[ThreadMessage]


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    turn: int = Field(ge=0, le=2**31, description="How many turns the fork shares (0 to the "
                                                  "thread's last turn).")


class ThreadDeleted(BaseModel):
    id: str
    deleted_at: float
    erased_runs: int = Field(description="Runs whose content was erased (turns and their "
                                         "delegated runs).")
    anchor_seq: int = Field(description="The `thread.deleted` record of the thread's audit "
                                        "chain holding each erased run's chain head.")

    @classmethod
    def of(cls, thread: ThreadRecord, anchor: AuditRecord) -> ThreadDeleted:
        """The deleted thread and the last record of its chain (its ``thread.deleted``)."""
        return cls(id=thread.id, deleted_at=thread.deleted_at or 0.0,
                   erased_runs=len(anchor.data.get("runs", [])), anchor_seq=anchor.seq)


# -- the thread event stream ---------------------------------------------------------------------


class ThreadAuditEvent(BaseModel):
    """Stream event: one durable audit record of a turn's run. Its SSE `id` is a thread
    cursor (opaque: send it back as Last-Event-ID)."""

    type: Literal["audit"]
    run_id: str
    turn: int
    record: AuditEntry


class TurnEndEvent(BaseModel):
    """Stream event: a turn finished and every record of it was sent (the stream stays open
    for the next turn). It has no SSE `id`; a reconnect after it does not repeat it."""

    type: Literal["turn.end"]
    run_id: str
    turn: int
    state: RunState
    answer: Any = Field(description="The turn's answer: text, or JSON for a typed agent.")
    last_event_id: str


class ThreadDeltaEvent(MessageDeltaEvent):
    """Stream event: a piece of a streaming model's answer in a turn (ephemeral, no SSE
    `id`, never replayed); `step`/`attempt`/`index` place it (a new `attempt` restarts it)."""

    turn: int = Field(description="The turn whose run is writing.")


class ThreadDeletedEvent(BaseModel):
    """Stream event: the thread was deleted; the server closes the stream after it."""

    type: Literal["thread.deleted"]
    thread_id: str


ThreadStreamEvent = Annotated[
    ThreadAuditEvent | TurnEndEvent | ThreadDeltaEvent | ThreadDeletedEvent,
    Field(discriminator="type")]
"""The JSON `data` of every event of a thread stream, told apart by `type`."""

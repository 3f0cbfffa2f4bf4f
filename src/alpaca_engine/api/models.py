"""Request and response bodies of the HTTP API.

Explicit models (rather than the store records) keep internals such as lease owners out of
responses and make ``/openapi.json`` a complete, checkable contract.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from ..errors import ErrorCode, unstorable_text
from ..lifecycle import RunState
from ..store.records import ApprovalRecord, ApprovalStatus, RunRecord, StepKind, StepStatus
from ..telemetry.audit import AuditRecord

SEQ_MAX = 2**63 - 1
"""The largest sequence number (``?after=``, ``Last-Event-ID``): the stores' int64 range."""

TEXT_ERRORS = (str(ErrorCode.INVALID_UNICODE), str(ErrorCode.NUL_CHARACTER))
"""Validation error types that are also the problem ``code`` (api/problems.py)."""


def storable_text(text: Any) -> Any:
    """Refuse what no store can keep, rather than change what the caller sent: a lone
    surrogate or a NUL (``errors.unstorable_text``, which the engine applies to every input
    too). Runs before the type check (which has its own vaguer words for a surrogate);
    non-strings pass on."""
    if not isinstance(text, str):
        return text
    problem = unstorable_text(text)
    if problem is not None:
        raise PydanticCustomError(str(problem.code), problem.message, problem.details)
    return text


Text = Annotated[str, BeforeValidator(storable_text)]
"""A request string the stores can keep (422 ``invalid_unicode`` / ``nul_character``)."""

MAX_INPUT_CHARS = 512 * 1024
"""The longest run input or thread message, in characters (half the default body limit, so
an oversized text is a 422 naming the field rather than a 413)."""


class Budget(BaseModel):
    """Limits for the whole run tree; unset fields keep the workflow's defaults. Strict:
    ``true`` or ``"10"`` is refused, not read as 1 or 10."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    max_tool_calls: int | None = Field(default=None, ge=0, le=1_000_000)
    max_tokens: int | None = Field(default=None, ge=0, le=10**12)
    max_cost: float | None = Field(default=None, ge=0, le=10**9)
    deadline_seconds: float | None = Field(default=None, gt=0, le=10**8)


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: Text = Field(min_length=1, max_length=200)
    input: Text = Field(max_length=MAX_INPUT_CHARS)
    workflow: Text | None = Field(
        default=None, max_length=4096,
        description="A registered workflow, `NAME` (its latest version) or `NAME@VERSION`, "
                    "or a served one (`builtin:demo`, `file:STEM`, its ref); default: the "
                    "first served one. The run records the version it resolved.")
    budget: Budget | None = None


class Run(BaseModel):
    id: str
    tenant: str
    agent: str
    workflow: str
    thread_id: str | None = Field(default=None, description="The thread this run is a turn "
                                  "of (`GET /v1/threads/{id}`).")
    turn: int | None = Field(default=None, description="Its turn number in that thread.")
    input: str
    state: RunState
    output: Any = Field(description=(
        "The final answer: text, or for a typed agent (`output_type: json`, an agent with an "
        "`output_schema`) the JSON value it returned, already parsed (an object, array, "
        "number …). Null until the run succeeds."))
    output_type: Literal["text", "json"] = Field(description=(
        "`json` when `output` is a typed agent's JSON value, `text` otherwise."))
    error_code: str | None
    error_message: str | None
    parent_id: str | None
    root_id: str
    depth: int
    ancestry: list[str]
    idempotency_key: str | None
    budget: dict[str, Any]
    usage: dict[str, Any]
    created_at: float
    updated_at: float
    cancel_requested: bool

    @classmethod
    def of(cls, record: RunRecord) -> Run:
        data = record.model_dump(include=set(cls.model_fields))
        data["output"] = record.value
        return cls.model_validate(data)


class RunList(BaseModel):
    items: list[Run]


class CancelResult(BaseModel):
    run: Run
    affected: list[Run] = Field(description="The run and its subtree, children first.")


class Step(BaseModel):
    run_id: str
    seq: int
    kind: StepKind
    name: str
    status: StepStatus
    input: dict[str, Any]
    output: Any = None
    error: dict[str, Any] | None
    idempotency_key: str | None
    attempts: int
    started_at: float
    finished_at: float | None


class StepList(BaseModel):
    items: list[Step]


class Approval(BaseModel):
    id: str
    tenant: str
    run_id: str
    root_id: str
    step: int
    kind: str
    action: str
    arguments: dict[str, Any]
    reason: str
    requested_by: str
    status: ApprovalStatus
    created_at: float
    expires_at: float | None
    decided_by: str | None
    decided_at: float | None
    comment: str | None
    on_reject: str
    on_expiry: str

    @classmethod
    def of(cls, record: ApprovalRecord) -> Approval:
        return cls.model_validate(record.model_dump())


class ApprovalList(BaseModel):
    items: list[Approval]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    comment: Text | None = Field(default=None, max_length=10_000)


class AuditEntry(BaseModel):
    seq: int
    time: str
    run_id: str
    actor: str
    kind: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def of(cls, record: AuditRecord) -> AuditEntry:
        return cls.model_validate(record.to_dict())


class AuditList(BaseModel):
    items: list[AuditEntry]


class AuditRecordEvent(BaseModel):
    """Stream event: one durable audit record of `run_id`. Its SSE `id` is the position to
    resume after (the record's seq; a tree cursor on a `tree=true` stream)."""

    type: Literal["audit"]
    run_id: str = Field(description="The run the record belongs to (a child on a tree stream).")
    record: AuditEntry


class EndEvent(BaseModel):
    """Stream event: the run (every run of the tree on a `tree=true` stream) is terminal and
    every record was sent; the server closes the stream after it. It has no SSE `id`."""

    type: Literal["end"]
    run_id: str = Field(description="The run the stream was opened for.")
    state: RunState = Field(description="That run's terminal state.")
    last_event_id: str | None = Field(
        description="The id of the last record event: reconnecting with it answers 204.")


class ToolCallPiece(BaseModel):
    """A piece of a tool call being written: `id` and `name` come with its first piece."""

    index: int = Field(description="Which call of the turn (0, 1 …).")
    id: str | None
    name: str | None
    arguments: str = Field(description="The next fragment of the call's JSON arguments.")


class MessageDeltaEvent(BaseModel):
    """Stream event, ephemeral (no SSE `id`, never replayed): a piece of a model turn as a
    streaming model writes it. Join the `text` of one (`step`, `attempt`) in `index` order
    to show the answer as it comes; a new `attempt` for a step means the stream restarted
    (discard what was shown for that step); a missing `index` means pieces were lost. The
    completed turn follows as a durable `model.output` record, which is authoritative."""

    type: Literal["message.delta"]
    run_id: str = Field(description="The run whose model is writing (a child on a tree "
                                    "stream).")
    step: int = Field(description="The model step's seq.")
    attempt: int = Field(description="1, then 2 … when a cut stream was retried.")
    index: int = Field(description="The piece's position within (step, attempt), from 0.")
    text: str | None = Field(default=None, description="A piece of the answer text.")
    tool_call: ToolCallPiece | None = Field(default=None,
                                            description="Or a piece of a tool call.")


RunStreamEvent = Annotated[AuditRecordEvent | MessageDeltaEvent | EndEvent,
                           Field(discriminator="type")]
"""The JSON `data` of every event of a run stream, told apart by `type`."""


class AuditVerification(BaseModel):
    ok: bool
    records: int
    head_seq: int = Field(description="The last seq the run's row says its chain has: "
                                      "records missing up to it are reported as deleted.")
    first_bad_seq: int | None
    reason: str | None
    deleted_with: str | None = Field(
        default=None, description="The thread whose deletion erased this run's content and "
        "chain (`ok` then says the run's head is anchored in that thread's audit chain).")
    anchor_seq: int | None = Field(
        default=None, description="The seq of the `thread.deleted` record of that thread's "
        "chain that holds this run's head.")


class AgentInfo(BaseModel):
    workflow: str
    name: str
    description: str | None
    model: str
    tools: list[str]
    capabilities: list[str] | None
    delegates_to: list[str]
    max_steps: int
    budget: dict[str, Any]
    approval: dict[str, Any]
    output_schema: dict[str, Any] | None = Field(
        default=None, description="The JSON Schema of a typed agent's answer.")


class AgentList(BaseModel):
    items: list[AgentInfo]


class ToolInfo(BaseModel):
    workflow: str = Field(description="The served workflow's ref, or `catalog`.")
    python: str | None = Field(default=None, description="The import path a registered "
                               "workflow names this tool by (`python:`), for Python tools.")
    name: str
    description: str
    source: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    capabilities: list[str]
    retry: dict[str, Any]
    breaker: dict[str, Any] | None
    timeout: float | None
    approval: str
    cost: float


class ToolList(BaseModel):
    items: list[ToolInfo]


class Breaker(BaseModel):
    tool: str
    state: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    window: list[bool]
    opened_at: float | None
    half_open_in_flight: int
    half_open_successes: int


class BreakerList(BaseModel):
    items: list[Breaker]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    store: str

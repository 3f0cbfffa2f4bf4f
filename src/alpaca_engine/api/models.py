"""Request and response bodies of the HTTP API.

Explicit models (rather than the store records) keep internals such as lease owners out of
responses and make ``/openapi.json`` a complete, checkable contract.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..lifecycle import RunState
from ..store.records import ApprovalRecord, ApprovalStatus, RunRecord, StepKind, StepStatus
from ..telemetry.audit import AuditRecord


class Budget(BaseModel):
    """Limits for the whole run tree; unset fields keep the workflow's defaults."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    max_tool_calls: int | None = Field(default=None, ge=0, le=1_000_000)
    max_tokens: int | None = Field(default=None, ge=0, le=10**12)
    max_cost: float | None = Field(default=None, ge=0, le=10**9)
    deadline_seconds: float | None = Field(default=None, gt=0, le=10**8)


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=200)
    input: str
    workflow: str | None = Field(
        default=None, description="A served workflow ref (default: the first served one).")
    budget: Budget | None = None


class Run(BaseModel):
    id: str
    tenant: str
    agent: str
    workflow: str
    input: str
    state: RunState
    output: str | None
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
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


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
    comment: str | None = Field(default=None, max_length=10_000)


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


class AuditVerification(BaseModel):
    ok: bool
    records: int
    head_seq: int = Field(description="The last seq the run's row says its chain has: "
                                      "records missing up to it are reported as deleted.")
    first_bad_seq: int | None
    reason: str | None


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


class AgentList(BaseModel):
    items: list[AgentInfo]


class ToolInfo(BaseModel):
    workflow: str
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

"""The records every store keeps: runs, steps, audit entries, approvals, keys, workflows,
threads."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from ..lifecycle import RunState
from ..telemetry.audit import GENESIS
from ..telemetry.logging import redact_value


class StepStatus(StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"


class StepKind(StrEnum):
    MODEL = "model"
    TOOL = "tool"
    DELEGATION = "delegation"
    APPROVAL = "approval"


class RunRecord(BaseModel):
    id: str
    tenant: str = "local"
    agent: str
    workflow: str
    """Where the agent definition comes from (a workflow file path or ``builtin:NAME``)."""
    input: str
    state: RunState = RunState.QUEUED
    output: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    parent_id: str | None = None
    root_id: str = ""
    depth: int = 0
    ancestry: list[str] = Field(default_factory=list)
    thread_id: str | None = None
    """The thread this run is a turn of (DESIGN §10); ``None`` for plain runs and children."""
    turn: int | None = None
    """1, 2, 3 ... within its thread, assigned by the store when the turn is created."""
    idempotency_key: str | None = None
    budget: dict[str, Any] = Field(default_factory=dict)
    usage: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    epoch: int = 0
    cancel_requested: bool = False
    capabilities: list[str] | None = None
    """Effective capabilities (a child's own ∩ its parent's); ``None`` = the agent's own."""
    ledgers: list[str] = Field(default_factory=list)
    """Budget ledgers this run reserves on: the root's, then any sub-limit ledgers."""
    traceparent: str | None = None
    audit_seq: int = 0
    audit_hash: str = GENESIS
    """The audit chain head (last seq and hash), written with every append: verification
    compares the stored chain with it, so deleted records are caught (DESIGN §7)."""
    crash_count: int = 0
    """Crash recoveries so far (lease expired or owner dead, then requeued or taken over);
    at ``ALPACA_MAX_RUN_ATTEMPTS`` the run fails with ``crash_loop`` instead."""

    @property
    def audit_head(self) -> tuple[int, str]:
        """``(audit_seq, audit_hash)``: where the next audit record links."""
        return self.audit_seq, self.audit_hash

    def with_head(self, head: tuple[int, str]) -> RunRecord:
        """A copy whose audit head is ``head`` (after an append in the same transaction)."""
        return self.model_copy(update={"audit_seq": head[0], "audit_hash": head[1]})
    output_type: Literal["text", "json"] = "text"
    """``json`` when ``output`` is the canonical JSON text of a typed agent's answer."""

    @property
    def value(self) -> Any:
        """The output as its reader should see it: the JSON value of a typed run, the text
        of any other (a stored value that no longer parses stays text rather than failing)."""
        if self.output is None or self.output_type != "json":
            return self.output
        try:
            return json.loads(self.output)
        except ValueError:
            return self.output


def unfinished_step_error(state: RunState, error_code: str | None) -> dict[str, Any]:
    """The error every store writes on a step still ``started`` when its run ends."""
    return {"code": error_code or str(state),
            "message": f"the run ended {state} before this step finished"}


class StepRecord(BaseModel):
    run_id: str
    seq: int
    kind: StepKind
    name: str
    status: StepStatus = StepStatus.STARTED
    input: dict[str, Any] = Field(default_factory=dict)
    output: Any = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    attempts: int = 1
    started_at: float = 0.0
    finished_at: float | None = None
    reserved: dict[str, float] | None = None


class AuditEvent(BaseModel):
    """An audit entry to append in the same transaction as the write it describes.

    Its data is redacted on construction (registered secrets, ``sk-`` keys, bearer tokens,
    values under secret-looking keys), so no store can ever persist a secret in the chain.
    """

    kind: str
    data: dict[str, Any] = Field(default_factory=dict)
    actor: str = "engine"

    @field_validator("data", mode="after")
    @classmethod
    def _redact(cls, value: dict[str, Any]) -> dict[str, Any]:
        redacted: dict[str, Any] = redact_value(value)
        return redacted

    @classmethod
    def of_redacted(cls, kind: str, data: dict[str, Any], actor: str = "engine") -> AuditEvent:
        """An entry whose data is built only from values already through ``redact_value``
        (the runner's redacted model turn): skips scanning a long answer a second time."""
        return cls.model_construct(kind=kind, data=data, actor=actor)


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


class ApprovalRecord(BaseModel):
    """A decision a supervisor must make before a gated action happens (DESIGN §5)."""

    id: str
    tenant: str = "local"
    run_id: str
    root_id: str
    step: int
    kind: str = "tool"
    """``tool`` or ``delegation``."""
    action: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    requested_by: str = ""
    status: ApprovalStatus = ApprovalStatus.PENDING
    created_at: float = 0.0
    expires_at: float | None = None
    decided_by: str | None = None
    decided_at: float | None = None
    comment: str | None = None
    on_reject: str = "return"
    """``return`` the rejection to the model as the tool result, or ``fail`` the run."""
    on_expiry: str = "deny"
    """``deny`` (the run fails) or ``approve``."""


class ApiKeyRecord(BaseModel):
    id: str
    tenant: str
    role: str
    key_hash: str
    name: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None


class LedgerRecord(BaseModel):
    id: str
    limits: dict[str, float] = Field(default_factory=dict)
    used: dict[str, float] = Field(default_factory=dict)
    exhausted: str | None = None


class WorkflowRecord(BaseModel):
    """One immutable version of a registered workflow (DESIGN §11), per tenant and name.

    ``version`` is assigned by the store (1, 2, 3 ... per tenant and name); ``content_hash``
    is the SHA-256 of the document's canonical JSON, so a re-push that only changes comments
    or layout is the same content. ``source`` is the text exactly as pushed.
    """

    tenant: str
    name: str
    version: int = 0
    content_hash: str
    author: str = ""
    created_at: float = 0.0
    format: str = "yaml"
    """``yaml`` or ``json``: how ``source`` is written."""
    source: str


def workflow_not_found(name: str, version: int | None = None) -> str:
    """The one NotFound message of every store for a missing workflow (or version)."""
    which = f"workflow {name!r}" if version is None else f"version {version} of workflow {name!r}"
    return f"{which} not found"


class ThreadRecord(BaseModel):
    """A conversation (DESIGN §10): every user message is one run of ``agent``, a turn.

    ``workflow`` is the ref every turn runs on (pinned: ``registry:NAME@V`` for a registered
    workflow, whose number is ``workflow_version``). ``ledger_id`` names the thread's own
    budget ledger, which every turn's run also reserves on. A deleted thread keeps its row
    (``deleted_at``, content erased) and its audit chain: the anchors of its deleted runs.
    """

    id: str
    tenant: str = "local"
    agent: str
    workflow: str
    workflow_version: int | None = None
    title: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any] = Field(default_factory=dict)
    ledger_id: str | None = None
    forked_from: str | None = None
    """The thread this one was forked from, sharing its first ``forked_turn`` turns."""
    forked_turn: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    deleted_at: float | None = None


class TurnCopy(BaseModel):
    """One turn of a fork: a copy of the source turn's run (new id, the new thread) with its
    journal, and the audit events starting the copy's own chain (``run.forked`` ...)."""

    run: RunRecord
    steps: list[StepRecord] = Field(default_factory=list)
    audit: list[AuditEvent] = Field(default_factory=list)


def thread_not_found(thread_id: str) -> str:
    """The one NotFound message of every store for a missing (or deleted) thread."""
    return f"thread {thread_id} not found"

"""Bodies of the ``/v1/workflows`` routes (DESIGN §11)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..store.records import WorkflowRecord
from ..telemetry.logging import redact_text
from ..workflow import Workflow
from ..workflows.loader import Diagnosis
from ..workflows.registry import content_hash, registry_ref
from ..workflows.schema import WorkflowError


class Issue(BaseModel):
    """One error or warning of a workflow document, where it is."""

    path: str = Field(description="The field, as in `agents[1].tools[0]` (`(root)` for the "
                                  "whole document, empty when unknown).",
                      examples=["agents[1].tools[0]"])
    line: int | None = Field(description="1-based line in the pushed text, when known.")
    message: str

    @classmethod
    def of(cls, error: WorkflowError) -> Issue:
        # The path and message may quote the document: a lone surrogate it held cannot be
        # encoded in the response (U+FFFD instead), and a secret it held is masked.
        return cls(path=redact_text(error.field), line=error.line,
                   message=redact_text(error.message))


class WorkflowVersion(BaseModel):
    name: str
    version: int
    ref: str = Field(description="What a run records: `registry:NAME@VERSION`.",
                     examples=["registry:triage@3"])
    content_hash: str
    author: str
    created_at: float
    format: Literal["yaml", "json"]
    source: str | None = Field(default=None, description="The text as pushed (only when one "
                                                         "version is asked for).")

    @classmethod
    def of(cls, record: WorkflowRecord, *, source: bool = False) -> WorkflowVersion:
        return cls(name=record.name, version=record.version,
                   ref=registry_ref(record.name, record.version),
                   content_hash=record.content_hash, author=record.author,
                   created_at=record.created_at,
                   format="json" if record.format == "json" else "yaml",
                   source=record.source if source else None)


class WorkflowPushed(WorkflowVersion):
    created: bool = Field(description="False when the latest version had the same content "
                                      "(it is returned, nothing new is stored).")
    warnings: list[Issue] = Field(default_factory=list)

    @classmethod
    def of_push(cls, record: WorkflowRecord, created: bool, found: Diagnosis) -> WorkflowPushed:
        return cls(**WorkflowVersion.of(record).model_dump(), created=created,
                   warnings=[Issue.of(w) for w in found.warnings])


class WorkflowSummary(BaseModel):
    name: str = Field(description="A registered name, or `builtin:NAME` / `file:STEM` for "
                                  "the workflows the server serves.")
    kind: Literal["registered", "served"]
    read_only: bool
    ref: str = Field(description="What runs of its latest version record.")
    version: int | None = Field(description="The latest version (registered only).")
    author: str | None = None
    created_at: float | None = None
    content_hash: str | None = None


    @classmethod
    def registered(cls, record: WorkflowRecord) -> WorkflowSummary:
        return cls(name=record.name, kind="registered", read_only=False,
                   ref=registry_ref(record.name, record.version), version=record.version,
                   author=record.author, created_at=record.created_at,
                   content_hash=record.content_hash)

    @classmethod
    def served(cls, name: str, workflow: Workflow) -> WorkflowSummary:
        return cls(name=name, kind="served", read_only=True, ref=workflow.ref, version=None)


class WorkflowList(BaseModel):
    items: list[WorkflowSummary]


class WorkflowDetail(WorkflowSummary):
    versions: list[WorkflowVersion] = Field(description="Newest first (registered only).")
    agents: list[str] = Field(description="Agents of the latest version, in file order.")


class WorkflowValidation(BaseModel):
    valid: bool
    name: str | None = None
    content_hash: str | None = Field(default=None, description="What a push of this text "
                                                               "would be stored under.")
    agents: list[str] = Field(default_factory=list)
    errors: list[Issue]
    warnings: list[Issue]

    @classmethod
    def of(cls, found: Diagnosis) -> WorkflowValidation:
        valid = not found.errors and found.workflow is not None
        return cls(valid=valid, name=found.spec.name if found.spec is not None else None,
                   content_hash=content_hash(found.data) if valid else None,
                   agents=list(found.workflow.agents) if found.workflow is not None else [],
                   errors=[Issue.of(e) for e in found.errors],
                   warnings=[Issue.of(w) for w in found.warnings])

"""The ``/v1/workflows`` routes (DESIGN §11): push, validate, list, read and draw workflows.

Pushing needs the ``builder`` (or ``admin``) role; any key may list, read, validate and run
them. Everything is scoped to the caller's tenant: another tenant's workflow answers 404.
The workflows the server serves from files and ``builtin:*`` are listed beside the
registered ones, read-only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam

from ..errors import NotFound
from ..workflow import Workflow
from ..workflows.graph import Graph, workflow_graph
from ..workflows.loader import Diagnosis
from ..workflows.registry import WorkflowRejected, parse_name
from ..workflows.schema import WorkflowError
from .auth import Role, require
from .models_workflows import (
    Issue,
    WorkflowDetail,
    WorkflowList,
    WorkflowPushed,
    WorkflowSummary,
    WorkflowValidation,
    WorkflowVersion,
)
from .problems import Problem, ProblemError
from .routes import AUTHED, Caller, State, errors
from .state import ApiState
from .workflow_names import served_names

workflows = APIRouter(prefix="/v1", tags=["workflows"])

NamePath = Annotated[str, PathParam(
    pattern=r"^((builtin|file):)?[A-Za-z0-9_.-]{1,64}$",
    description="A registered workflow's name, or `builtin:NAME` / `file:STEM` for a served "
                "one.")]
VersionPath = Annotated[int, PathParam(ge=1, le=999_999_999, description="A version number.")]

_JSON = frozenset({"application/json"})
_YAML = frozenset({"", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml",
                   "text/plain"})
_DOCUMENT = {"requestBody": {
    "required": True,
    "description": "A workflow in the file format of DESIGN §9, with `name:` inside; YAML "
                   "(`application/yaml`) or JSON (`application/json`).",
    "content": {"application/yaml": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}}},
}}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    out = errors(*AUTHED, *codes)
    out[415] = {"model": Problem, "description": "Not YAML or JSON"}
    return out


async def _document(request: Request) -> tuple[str, str]:
    """The pushed text and its format, from the body and its Content-Type."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in _JSON:
        fmt = "json"
    elif media in _YAML:
        fmt = "yaml"
    else:
        raise ProblemError(415, "unsupported_media_type",
                           f"a workflow is sent as application/yaml or application/json, "
                           f"not {media}")
    try:
        return (await request.body()).decode("utf-8"), fmt
    except UnicodeDecodeError:
        raise ProblemError(400, "bad_request", "the body is not UTF-8 text") from None


def _rejected(diagnosis: Diagnosis) -> ProblemError:
    found = [Issue.of(e) for e in diagnosis.errors]
    warnings = [Issue.of(w) for w in diagnosis.warnings]
    first = found[0] if found else Issue(path="name", line=None, message="required")
    where = f"{first.path} (line {first.line})" if first.line else first.path
    return ProblemError(
        422, "invalid_workflow",
        f"the workflow has {len(found)} error{'s' if len(found) != 1 else ''}; nothing was "
        f"stored. First: {where}: {first.message}",
        errors=[i.model_dump() for i in found], warnings=[i.model_dump() for i in warnings])


async def _workflow(st: ApiState, tenant: str, name: str) -> Workflow:
    """A served workflow by name, or a registered one (``name`` or ``name@V``) loaded."""
    if parse_name(name) is None:
        served = served_names(st.served).get(name)
        if served is None:
            raise NotFound(f"workflow {name!r} not found")
        return served
    try:
        return await st.engine.registry.resolve(tenant, name)
    except WorkflowError as exc:
        raise ProblemError(503, "workflow_error", f"workflow {name!r} does not load now: {exc}"
                           ) from None


# ------------------------------------------------------------------------------- routes


@workflows.get("/workflows", response_model=WorkflowList, responses=errors(*AUTHED))
async def list_workflows(st: State, who: Caller) -> WorkflowList:
    """The tenant's registered workflows (their latest versions), then the served ones."""
    require(who, Role.USER)
    items = [WorkflowSummary.registered(r) for r in await st.store.list_workflows(who.tenant)]
    items += [WorkflowSummary.served(name, wf) for name, wf in served_names(st.served).items()]
    return WorkflowList(items=items)


@workflows.post("/workflows", status_code=201, response_model=WorkflowPushed,
                openapi_extra=_DOCUMENT,
                responses={200: {"model": WorkflowPushed, "description": "The latest version "
                                 "already has this content: it is returned"},
                           **_responses()})
async def push_workflow(request: Request, response: Response, st: State,
                        who: Caller) -> WorkflowPushed:
    """Validate and store a new version (builder or admin). 422 lists every error."""
    require(who, Role.BUILDER)
    text, fmt = await _document(request)
    try:
        record, created, found = await st.engine.registry.push(who.tenant, text, fmt=fmt,
                                                               author=who.label)
    except WorkflowRejected as exc:
        raise _rejected(exc.diagnosis) from None
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/workflows/{record.name}/versions/{record.version}"
    return WorkflowPushed.of_push(record, created, found)


@workflows.post("/workflows/validate", response_model=WorkflowValidation,
                openapi_extra=_DOCUMENT, responses=_responses())
async def validate_workflow(request: Request, st: State, who: Caller) -> WorkflowValidation:
    """Every error (and warning) at once, each with its path and line; nothing is stored."""
    require(who, Role.USER)
    text, _fmt = await _document(request)
    return WorkflowValidation.of(await st.engine.registry.validate(text))


@workflows.get("/workflows/{name}", response_model=WorkflowDetail,
               responses=errors(*AUTHED, 404, 503))
async def get_workflow(name: NamePath, st: State, who: Caller) -> WorkflowDetail:
    """A workflow and its versions (newest first)."""
    require(who, Role.USER)
    if parse_name(name) is None:
        served = await _workflow(st, who.tenant, name)
        return WorkflowDetail(**WorkflowSummary.served(name, served).model_dump(), versions=[],
                              agents=list(served.agents))
    versions = await st.engine.registry.versions(who.tenant, name)
    loaded = await _workflow(st, who.tenant, f"{name}@{versions[0].version}")
    return WorkflowDetail(**WorkflowSummary.registered(versions[0]).model_dump(),
                          versions=[WorkflowVersion.of(v) for v in versions],
                          agents=list(loaded.agents))


@workflows.get("/workflows/{name}/versions/{version}", response_model=WorkflowVersion,
               responses=errors(*AUTHED, 404))
async def get_workflow_version(name: NamePath, version: VersionPath, st: State,
                               who: Caller) -> WorkflowVersion:
    """One version, with the text as it was pushed."""
    require(who, Role.USER)
    if parse_name(name) is None:
        raise NotFound(f"workflow {name!r} is served from the server's disk and has no "
                       "versions")
    record = await st.store.get_workflow(who.tenant, name, version)
    return WorkflowVersion.of(record, source=True)


@workflows.get("/workflows/{name}/graph", response_model=Graph,
               responses=errors(*AUTHED, 404, 503))
async def workflow_graph_latest(name: NamePath, st: State, who: Caller) -> Graph:
    """The latest version as nodes and edges a builder can draw."""
    require(who, Role.USER)
    return workflow_graph(await _workflow(st, who.tenant, name))


@workflows.get("/workflows/{name}/versions/{version}/graph", response_model=Graph,
               responses=errors(*AUTHED, 404, 503))
async def workflow_graph_version(name: NamePath, version: VersionPath, st: State,
                                 who: Caller) -> Graph:
    """One version as nodes and edges."""
    require(who, Role.USER)
    if parse_name(name) is None:
        raise NotFound(f"workflow {name!r} is served from the server's disk and has no "
                       "versions")
    return workflow_graph(await _workflow(st, who.tenant, f"{name}@{version}"))

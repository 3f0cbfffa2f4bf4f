"""The workflow file format (version 1) as pydantic models, and the errors it reports.

Every model forbids unknown fields and is strict (no ``"10"`` -> ``10`` coercion), so a typo in
a workflow file is an error with a line number instead of a setting silently ignored. Unions
that pydantic would otherwise try branch by branch (tool kinds, model providers, script items)
use callable discriminators whose tags start with ``TAG_PREFIX``: the loader drops those tags
from error locations so that they map back onto the YAML node tree.
"""

from __future__ import annotations

import re
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from ..tools.breaker import BreakerPolicy
from ..tools.contracts import Contract, SchemaError
from ..tools.http import DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_TEXT_CHARS, METHODS
from ..tools.retry import RetryPolicy

Loc = tuple[str | int, ...]
"""A path into the document: mapping keys and list indices, as pydantic reports them."""

TAG_PREFIX = "="
"""Marks a union tag in a pydantic error location; it names no YAML node."""

PROVIDERS = ("scripted", "function", "openai")

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI-style providers accept as a tool name
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Request keys the OpenAI adapter owns (see models/openai.py); refused here so the error has a line.
_RESERVED_SETTINGS = frozenset({"model", "messages", "tools", "stream", "stream_options"})


class WorkflowError(Exception):
    """A workflow that cannot be loaded, pinned to a file, a line and a field."""

    def __init__(self, source: str, line: int | None, field: str, message: str) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type[WorkflowError], tuple[str, int | None, str, str]]:
        # Keeps the fields when the error crosses a process boundary (worker pools).
        return (type(self), (self.source, self.line, self.field, self.message))

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if not self.field:
            return f"{where}: {self.message}"
        return f"{where}: {self.field}: {self.message}"


class SpecError(Exception):
    """A problem found while building objects from a valid spec; ``loc`` is relative.

    Builders raise it with the location they know; callers prefix their own part, and the loader
    turns it into a ``WorkflowError`` with the line of that node.
    """

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message

    def within(self, *prefix: str | int) -> SpecError:
        return SpecError((*prefix, *self.loc), self.message)


# -- field validators (their messages reach users as-is) ---------------------------------------


def _import_path(value: str) -> str:
    if not _IMPORT_PATH.fullmatch(value):
        raise ValueError("expected 'module:attribute' (for example 'tools:add')")
    return value


def _env_name(value: str) -> str:
    # Never echo the value: someone may have pasted the key itself here.
    if not _ENV_NAME.fullmatch(value):
        raise ValueError(
            "must be the NAME of an environment variable (e.g. OPENAI_API_KEY), never the key"
        )
    return value


def _url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _args(value: Any) -> Any:
    # A string is allowed on purpose: it scripts malformed JSON arguments.
    if not isinstance(value, dict | str):
        raise ValueError("expected a mapping of arguments (or a raw JSON string)")
    return value


def _method(value: str) -> str:
    method = value.upper()
    if method not in METHODS:
        raise ValueError(f"expected one of {', '.join(METHODS)}")
    return method


def _json_schema(value: dict[str, Any]) -> dict[str, Any]:
    # Compiled now, so a broken contract is a load error with a line, not a failing call.
    try:
        Contract(value)
    except SchemaError as exc:
        raise ValueError(str(exc)) from None
    return value


def _version(value: int) -> int:
    if value != 1:
        raise ValueError(f"unsupported version {value}; this engine reads version 1")
    return value


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("a name is 1-64 letters, digits, '_' or '-'")
    return value


Name = Annotated[str, AfterValidator(_name)]
ImportPath = Annotated[str, AfterValidator(_import_path)]
Url = Annotated[str, AfterValidator(_url)]
JsonSchema = Annotated[dict[str, Any], AfterValidator(_json_schema)]


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- policies ----------------------------------------------------------------------------------


class RetrySpec(Spec):
    max_attempts: int = Field(default=1, ge=1)
    initial_delay: float = Field(default=0.2, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_delay: float = Field(default=10.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    attempt_timeout: float | None = Field(default=None, gt=0)

    def to_policy(self) -> RetryPolicy:
        return RetryPolicy(**self.model_dump())


class BreakerSpec(Spec):
    failure_threshold: int = Field(default=5, ge=1)
    failure_rate_threshold: float | None = Field(default=0.5, gt=0, le=1)
    window_size: int = Field(default=20, ge=1)
    minimum_calls: int = Field(default=10, ge=1)
    reset_timeout: float = Field(default=30.0, ge=0)
    half_open_max_calls: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> BreakerSpec:
        if self.minimum_calls > self.window_size:
            raise ValueError("minimum_calls must not exceed window_size (the rate rule could"
                             " never fire)")
        return self

    def to_policy(self) -> BreakerPolicy:
        return BreakerPolicy(**self.model_dump())


class SubBudgetSpec(Spec):
    """Limits for a subtree; a child never gets more than its parent has left."""

    max_steps: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost: float | None = Field(default=None, ge=0)


class BudgetSpec(SubBudgetSpec):
    deadline_seconds: float | None = Field(default=None, gt=0)


class PriceSpec(Spec):
    """USD per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class DefaultsSpec(Spec):
    max_depth: int = Field(default=3, ge=0)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec())
    prices: dict[str, PriceSpec] = Field(default_factory=dict)


# -- tools -------------------------------------------------------------------------------------


class GovernedSpec(Spec):
    """The governance fields every tool entry has; left out, the Tool defaults apply."""

    capabilities: list[str] | None = None
    retry: RetrySpec | None = None
    breaker: BreakerSpec | None = None
    timeout: float | None = Field(default=None, gt=0)
    approval: Literal["never", "required"] | None = None
    cost: float | None = Field(default=None, ge=0)


class ToolEntry(GovernedSpec):
    """One Python tool. Fields left out keep the values of an ``@tool`` object (or make_tool
    defaults)."""

    name: Name | None = None
    python: ImportPath
    description: str | None = None


class HttpSpec(Spec):
    """``http:`` of a tool: the request template. Header values reference secrets as ${ENV}."""

    method: Annotated[str, AfterValidator(_method)] = "GET"
    url: Url
    headers: dict[str, str] = Field(default_factory=dict)
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1)
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=1)


class HttpToolEntry(GovernedSpec):
    """A tool that calls an HTTP endpoint (see tools/http.py)."""

    name: Name
    http: HttpSpec
    description: str = ""
    input_schema: JsonSchema | None = None
    output_schema: JsonSchema | None = None


class McpSpec(Spec):
    """``mcp:`` of a tool entry: how to reach the server (a command for stdio, or a url)."""

    server: Name
    command: list[str] | None = Field(default=None, min_length=1)
    url: Url | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    prefix: str | None = None
    # tools.mcp.DEFAULT_CONNECT_TIMEOUT; not imported: the MCP SDK takes a second to import,
    # and only workflows that use it should pay for it.
    connect_timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _one_transport(self) -> McpSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either command (a stdio server) or url (streamable HTTP)")
        if self.url is not None and (self.env or self.cwd is not None):
            raise ValueError("env and cwd apply to stdio servers (command) only")
        if self.command is not None and self.headers:
            raise ValueError("headers apply to HTTP servers (url) only")
        return self


class McpToolEntry(GovernedSpec):
    """Every tool of an MCP server (filtered by ``include``/``exclude`` globs on their names);
    the governance fields apply to each of them."""

    mcp: McpSpec
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)


_TOOL_KINDS = ("python", "http", "mcp")


def _tool_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [kind for kind in _TOOL_KINDS if kind in value]
        if len(kinds) > 1:
            return None
        return f"={kinds[0]}" if kinds else "=python"  # no kind: say what a python entry needs
    if isinstance(value, HttpToolEntry):
        return "=http"
    if isinstance(value, McpToolEntry):
        return "=mcp"
    return "=python"


AnyToolEntry = Annotated[
    Annotated[ToolEntry, Tag("=python")] | Annotated[HttpToolEntry, Tag("=http")]
    | Annotated[McpToolEntry, Tag("=mcp")],
    Discriminator(
        _tool_kind,
        custom_error_type="tool_kind",
        custom_error_message="a tool entry has exactly one of python, http or mcp",
    ),
]


# -- models ------------------------------------------------------------------------------------


class UsageSpec(Spec):
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


class CallSpec(Spec):
    tool: str = Field(min_length=1)
    args: Annotated[Any, AfterValidator(_args)] = Field(default_factory=dict)
    id: str | None = None


class CallItem(CallSpec):
    """``{tool: NAME, args: {...}}``: one tool call (optionally with text)."""

    text: str | None = None
    usage: UsageSpec | None = None


class CallsItem(Spec):
    """``{calls: [{tool, args}, ...], text: ...}``: several tool calls in one turn."""

    calls: list[CallSpec] = Field(min_length=1)
    text: str | None = None
    usage: UsageSpec | None = None


def _script_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "=text"
    if isinstance(value, dict):
        if "calls" in value:
            return "=calls"
        if "tool" in value:
            return "=call"
    if isinstance(value, CallsItem):
        return "=calls"
    if isinstance(value, CallItem):
        return "=call"
    return None


ScriptItemSpec = Annotated[
    Annotated[str, Tag("=text")] | Annotated[CallItem, Tag("=call")]
    | Annotated[CallsItem, Tag("=calls")],
    Discriminator(
        _script_kind,
        custom_error_type="script_item",
        custom_error_message=(
            "a script item is a final-answer string, {tool: NAME, args: {...}}"
            " or {calls: [{tool: NAME, args: {...}}, ...], text: ...}"
        ),
    ),
]


class OfflineStreamSpec(Spec):
    """How an offline model streams its answers (so demos and tests show deltas)."""

    stream: bool = False
    chunk_size: int = Field(default=16, ge=1, le=1_000_000)
    delay: float = Field(default=0.0, ge=0, le=60)


class ScriptedModelSpec(OfflineStreamSpec):
    provider: Literal["scripted"]
    script: list[ScriptItemSpec] = Field(min_length=1)
    name: str | None = None


class FunctionModelSpec(OfflineStreamSpec):
    provider: Literal["function"]
    function: ImportPath
    name: str | None = None


class OpenAIModelSpec(Spec):
    provider: Literal["openai"]
    model: str = Field(min_length=1)
    base_url: Annotated[str, AfterValidator(_url)] | None = None
    api_key_env: Annotated[str, AfterValidator(_env_name)] = "OPENAI_API_KEY"
    timeout: float = Field(default=60.0, gt=0)
    settings: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec | None = None
    output_cap_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    """The request field that carries ``limits.max_output_tokens`` (servers that only know
    the older ``max_tokens`` need that one)."""
    stream: bool = True

    @model_validator(mode="after")
    def _settings_not_reserved(self) -> OpenAIModelSpec:
        reserved = sorted(_RESERVED_SETTINGS.intersection(self.settings))
        if reserved:
            raise ValueError(f"settings may not override {', '.join(reserved)}")
        return self


def _provider(value: Any) -> str | None:
    if isinstance(value, dict):
        provider = value.get("provider")
        return f"={provider}" if isinstance(provider, str) else None
    if isinstance(value, BaseModel):
        return f"={getattr(value, 'provider', '')}"
    return None


ModelSpec = Annotated[
    Annotated[ScriptedModelSpec, Tag("=scripted")]
    | Annotated[FunctionModelSpec, Tag("=function")]
    | Annotated[OpenAIModelSpec, Tag("=openai")],
    Discriminator(
        _provider,
        custom_error_type="invalid_provider",
        custom_error_message="expected a mapping with provider: scripted, function or openai",
    ),
]


# -- agents and the document -------------------------------------------------------------------


class LimitsSpec(Spec):
    max_steps: int = Field(default=25, ge=1)
    max_output_tokens: int = Field(default=1024, ge=1)
    budget: SubBudgetSpec = Field(default_factory=lambda: SubBudgetSpec())


class ApprovalSpec(Spec):
    """Which actions of an agent wait for a supervisor."""

    tools: list[str] = Field(default_factory=list)
    capabilities: list[str] = Field(default_factory=list)
    delegations: list[str] = Field(default_factory=list)
    cost_above: float | None = Field(default=None, ge=0)
    on_reject: Literal["return", "fail"] = "return"
    expires_after: float | None = Field(default=24 * 3600.0, gt=0)
    on_expiry: Literal["deny", "approve"] = "deny"


class HistorySpec(Spec):
    """How much of a thread's earlier turns each turn sends the model."""

    max_turns: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)


class AgentSpec(Spec):
    name: Name
    description: str = ""
    instructions: str = ""
    model: ModelSpec
    tools: list[str] = Field(default_factory=list)
    capabilities: list[str] | None = None
    delegates_to: list[str] = Field(default_factory=list)
    limits: LimitsSpec = Field(default_factory=lambda: LimitsSpec())
    approval: ApprovalSpec = Field(default_factory=lambda: ApprovalSpec())
    history: HistorySpec = Field(default_factory=lambda: HistorySpec())
    output_schema: JsonSchema | None = None
    output_retries: int = Field(default=1, ge=0, le=100)


class WorkflowSpec(Spec):
    version: Annotated[int, AfterValidator(_version)]
    name: Name | None = None
    """What the registry files it under (required to push one; files may leave it out)."""
    description: str = ""
    defaults: DefaultsSpec = Field(default_factory=lambda: DefaultsSpec())
    tools: list[AnyToolEntry] = Field(default_factory=list)
    agents: list[AgentSpec] = Field(min_length=1)


_TAGGED: dict[str, type[Spec]] = {
    "=python": ToolEntry,
    "=http": HttpToolEntry,
    "=mcp": McpToolEntry,
    "=scripted": ScriptedModelSpec,
    "=function": FunctionModelSpec,
    "=openai": OpenAIModelSpec,
    "=call": CallItem,
    "=calls": CallsItem,
}


def fields_at(loc: Loc) -> frozenset[str] | None:
    """Field names of the spec that ``loc`` points into, for "did you mean" hints.

    Follows the pydantic location through the spec classes; ``None`` where it cannot tell.
    """
    current: Any = WorkflowSpec
    for part in loc:
        if isinstance(part, str) and part.startswith(TAG_PREFIX):
            current = _TAGGED.get(part)
        elif isinstance(part, int):
            current = _list_item(current)
        elif isinstance(current, type) and issubclass(current, Spec) \
                and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
        else:
            return None
        if current is None:
            return None
    if isinstance(current, type) and issubclass(current, Spec):
        return frozenset(current.model_fields)
    return None


def _list_item(annotation: Any) -> Any:
    if get_origin(annotation) is list:
        return _model_in(get_args(annotation)[0])
    return None


def _model_in(annotation: Any) -> Any:
    """The annotation itself, or the one Spec class in an ``X | None``; lists stay lists."""
    if get_origin(annotation) is Annotated:
        return _model_in(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        specs = [a for a in get_args(annotation) if a is not type(None)]
        return _model_in(specs[0]) if len(specs) == 1 else annotation
    return annotation

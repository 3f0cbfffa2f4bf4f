"""The workflow file reference (docs/workflow-reference.md), generated from the pydantic schema.

Types, defaults and constraints come from ``schema.py`` itself; only the one-line meaning of
each field lives here, and ``missing_descriptions`` makes a test fail when a field has none,
so the page cannot drift from the format. Regenerate with
``uv run python -m alpaca_engine.workflows.reference > docs/workflow-reference.md``.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, Tag
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from . import schema
from .schema import Spec, WorkflowSpec

# What each field means, by "Class.field". Everything else on the page comes from the schema.
DESCRIPTIONS: dict[str, str] = {
    "WorkflowSpec.version": "The format version; this engine reads 1.",
    "WorkflowSpec.name": "What the registry files it under: required to push it "
                         "(`alpaca workflows push`), optional in a file.",
    "WorkflowSpec.description": "Free text shown beside the workflow in lists and the page.",
    "WorkflowSpec.defaults": "Settings for every run of this workflow.",
    "WorkflowSpec.tools": "The tool registry: Python functions, HTTP endpoints, MCP servers.",
    "WorkflowSpec.agents": "The agents; any of them can be the entry point of a run.",
    "DefaultsSpec.max_depth": "How deep delegation may go (the entry agent is depth 0).",
    "DefaultsSpec.budget": "The budget of a run's whole tree; a caller's budget overrides it "
                           "field by field.",
    "DefaultsSpec.prices": "Model name → token prices, to charge `cost` to the budget.",
    "BudgetSpec.deadline_seconds": "Wall-clock limit of the whole tree; then `timed_out`.",
    "SubBudgetSpec.max_steps": "Model and tool steps, counted over the whole subtree.",
    "SubBudgetSpec.max_tool_calls": "Tool calls over the subtree (delegations count as steps "
                                    "only).",
    "SubBudgetSpec.max_tokens": "Model input + output tokens over the subtree.",
    "SubBudgetSpec.max_cost": "USD: token prices plus each tool's declared `cost`.",
    "PriceSpec.input": "USD per million input tokens.",
    "PriceSpec.output": "USD per million output tokens.",
    "GovernedSpec.capabilities": "What the tool needs; an agent must hold all of them to call "
                                 "it. Unset: the tool's own (none for HTTP).",
    "GovernedSpec.retry": "Retries of transient failures. Unset: the tool's own (no retry).",
    "GovernedSpec.breaker": "Circuit breaker shared by every run. Unset: the tool's own (none).",
    "GovernedSpec.timeout": "Seconds per call. Unset: the tool's own (30).",
    "GovernedSpec.approval": "`required`: every call waits for a supervisor. Unset: the "
                             "tool's own (`never`).",
    "GovernedSpec.cost": "Declared USD per call, charged to `max_cost`. Unset: the tool's own "
                         "(0).",
    "ToolEntry.name": "The tool's name for models and allowlists. Unset: the function's name.",
    "ToolEntry.python": "`module:attribute` of a `@tool` or typed function; the workflow "
                        "file's folder is importable.",
    "ToolEntry.description": "What the model reads. Unset: the docstring.",
    "HttpToolEntry.name": "The tool's name for models and allowlists.",
    "HttpToolEntry.http": "The request to make.",
    "HttpToolEntry.description": "What the model reads.",
    "HttpToolEntry.input_schema": "JSON Schema of the arguments. Unset: the `{placeholders}` "
                                  "of the URL, required, and nothing else.",
    "HttpToolEntry.output_schema": "JSON Schema every response body must match.",
    "HttpSpec.method": "The HTTP method.",
    "HttpSpec.url": "URL template: `{name}` takes the argument `name` (URL-encoded); other "
                    "arguments go in the query (GET/DELETE) or the JSON body.",
    "HttpSpec.headers": "Request headers; `${ENV}` takes a secret from the environment.",
    "HttpSpec.max_response_bytes": "Larger responses fail the call.",
    "HttpSpec.max_text_chars": "A text (non-JSON) body is cut to this many characters.",
    "McpToolEntry.mcp": "How to reach the server.",
    "McpToolEntry.include": "Globs on the server's tool names to keep. Unset: all.",
    "McpToolEntry.exclude": "Globs on the server's tool names to drop.",
    "McpSpec.server": "A name for the server (the default tool-name prefix).",
    "McpSpec.command": "A stdio server: the command and its arguments.",
    "McpSpec.url": "A streamable-HTTP server's URL (instead of `command`).",
    "McpSpec.env": "Environment of a stdio server; `${ENV}` takes a secret.",
    "McpSpec.cwd": "Working directory of a stdio server.",
    "McpSpec.headers": "Headers sent to an HTTP server; `${ENV}` takes a secret.",
    "McpSpec.prefix": "Prepended to each tool's name. Unset: `<server>_`.",
    "McpSpec.connect_timeout": "Seconds to start or reach the server and list its tools.",
    "RetrySpec.max_attempts": "Attempts in all (1: no retry).",
    "RetrySpec.initial_delay": "Seconds before the first retry.",
    "RetrySpec.multiplier": "Each delay is the previous one times this.",
    "RetrySpec.max_delay": "Upper bound of one delay, in seconds.",
    "RetrySpec.jitter": "Random spread of each delay, as a fraction of it.",
    "RetrySpec.attempt_timeout": "Seconds per attempt. Unset: the tool's `timeout` only.",
    "BreakerSpec.failure_threshold": "Consecutive failures that open the breaker.",
    "BreakerSpec.failure_rate_threshold": "Failure rate over the window that opens it (null: "
                                          "off).",
    "BreakerSpec.window_size": "Calls the failure rate is computed over.",
    "BreakerSpec.minimum_calls": "Calls needed in the window before the rate counts.",
    "BreakerSpec.reset_timeout": "Seconds open (failing fast) before probing again.",
    "BreakerSpec.half_open_max_calls": "Probe calls admitted while half-open.",
    "AgentSpec.name": "The agent's name (runs, delegation tools `delegate_to_<name>`).",
    "AgentSpec.description": "What a delegating parent's model reads about this agent.",
    "AgentSpec.instructions": "The system message.",
    "AgentSpec.model": "Which model decides: `provider` picks one of the forms below.",
    "AgentSpec.tools": "Allowlist of tool names and globs (`read_*`); nothing else is callable.",
    "AgentSpec.capabilities": "Capabilities granted; unset: no limit beyond the allowlist. A "
                              "delegated run keeps only those its parent also holds.",
    "AgentSpec.delegates_to": "Agents this one may delegate to, each as a tool "
                              "`delegate_to_<agent>` taking `{task}`.",
    "AgentSpec.limits": "Per-run limits of this agent.",
    "AgentSpec.approval": "Which of its actions wait for a supervisor.",
    "AgentSpec.output_schema": "A JSON Schema the final answer must match: the model must "
                               "answer with JSON (a Markdown code fence around it is "
                               "allowed), the run's `output` is that JSON value, and a "
                               "delegating parent gets it parsed. OpenAI is asked for it "
                               "natively (`response_format`).",
    "AgentSpec.output_retries": "Corrections an answer that does not match gets (the "
                                "validator's message goes back to the model) before the run "
                                "fails `invalid_output`.",
    "LimitsSpec.max_steps": "Model turns of one run of this agent; then it fails "
                            "`max_steps_exceeded`.",
    "LimitsSpec.max_output_tokens": "Output token limit passed to the model per turn.",
    "LimitsSpec.budget": "A sub-budget for the subtree this agent runs (within the tree's).",
    "ApprovalSpec.tools": "Tool names and globs whose calls need approval.",
    "ApprovalSpec.capabilities": "Any tool needing one of these needs approval.",
    "ApprovalSpec.delegations": "Agents whose delegation needs approval.",
    "ApprovalSpec.cost_above": "A tool call declaring a higher `cost` needs approval.",
    "ApprovalSpec.on_reject": "`return`: the model gets the rejection as the tool's result; "
                              "`fail`: the run fails.",
    "ApprovalSpec.expires_after": "Seconds an approval waits (null: forever).",
    "ApprovalSpec.on_expiry": "What an expired approval becomes.",
    "AgentSpec.history": "What each turn of a thread sends the model of the earlier turns "
                         "(rebuilt from their journals; what is left out is audited as "
                         "`history.truncated`).",
    "HistorySpec.max_turns": "Most earlier turns sent, the newest whole ones (0: none). "
                             "Unset: all.",
    "HistorySpec.max_tokens": "Most estimated tokens (4 characters a token) of the earlier "
                              "turns sent; older whole turns are left out. Unset: no bound.",
    "ScriptedModelSpec.provider": "A model that plays a fixed list of turns (offline, "
                                  "deterministic).",
    "ScriptedModelSpec.script": "One item per model turn: a string is the final answer; "
                                "`{tool, args}` is a call; `{calls: [...]}` several.",
    "ScriptedModelSpec.name": "The model name in steps and traces. Unset: `scripted`.",
    "OfflineStreamSpec.stream": "Stream each answer in pieces (`message.delta` events, as a "
                                "provider would), the turn itself unchanged.",
    "OfflineStreamSpec.chunk_size": "Characters per streamed piece.",
    "OfflineStreamSpec.delay": "Seconds before each streamed piece (to watch it arrive).",
    "FunctionModelSpec.provider": "A Python function decides each turn (offline).",
    "FunctionModelSpec.function": "`module:function` taking `(messages, tools)` and returning "
                                  "a script item (string, `{tool, args}` or `{calls}`); may be "
                                  "async.",
    "FunctionModelSpec.name": "The model name in steps and traces. Unset: `function`.",
    "OpenAIModelSpec.provider": "Chat completions with tools, on the official `openai` SDK.",
    "OpenAIModelSpec.model": "The model name, e.g. `gpt-4o-mini`.",
    "OpenAIModelSpec.base_url": "Any OpenAI-compatible server (vLLM, Ollama, llama.cpp). "
                                "Unset: `OPENAI_BASE_URL`, else OpenAI.",
    "OpenAIModelSpec.api_key_env": "The NAME of the environment variable holding the key.",
    "OpenAIModelSpec.timeout": "Seconds per request.",
    "OpenAIModelSpec.settings": "Extra request fields (`temperature`, ...); not `model`, "
                                "`messages`, `tools`, `stream`, `stream_options`.",
    "OpenAIModelSpec.stream": "Stream answers (`message.delta` events on SSE; usage from the "
                              "stream). `false` for servers that cannot stream.",
    "OpenAIModelSpec.retry": "Retries of transient errors (429, 5xx, timeouts).",
    "OpenAIModelSpec.output_cap_param": "The request field that carries "
                                        "`limits.max_output_tokens`; `max_tokens` for servers "
                                        "that only know the older name.",
    "CallItem.text": "Text the model says along with the call.",
    "CallItem.usage": "Tokens to report for this turn. Unset: 10 in, 5 out.",
    "CallsItem.calls": "The tool calls of this turn, executed in order.",
    "CallsItem.text": "Text the model says along with the calls.",
    "CallsItem.usage": "Tokens to report for this turn. Unset: 10 in, 5 out.",
    "CallSpec.tool": "The tool (or `delegate_to_<agent>`) to call.",
    "CallSpec.args": "Its arguments; a string is sent as raw (possibly invalid) JSON.",
    "CallSpec.id": "The call id. Unset: `call_<turn>_<index>`.",
    "UsageSpec.input_tokens": "Input tokens.",
    "UsageSpec.output_tokens": "Output tokens.",
}

# Constrained string types of the schema, by the validator that defines them.
_VALIDATED = {
    schema._name: "name",
    schema._import_path: "`module:attribute`",
    schema._url: "http(s) URL",
    schema._json_schema: "JSON Schema",
    schema._method: "HTTP method",
    schema._env_name: "variable name",
    schema._version: "integer",
    schema._args: "mapping or string",
}
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}


@dataclass(frozen=True)
class Section:
    """One spec class, at the path where the document first reaches it."""

    path: str
    spec: type[Spec]
    label: str = ""


def sections() -> list[Section]:
    """Every spec class reachable from WorkflowSpec, depth first in field order."""
    found: list[Section] = []
    seen: set[type[Spec]] = set()

    def visit(section: Section) -> None:
        if section.spec in seen:
            return
        seen.add(section.spec)
        found.append(section)
        for name, field in section.spec.model_fields.items():
            for sub_path, spec, label in _nested(f"{section.path}.{name}".lstrip("."),
                                                 field.annotation, field.metadata):
                visit(Section(sub_path, spec, label))

    visit(Section("", WorkflowSpec, "the document"))
    return found


def _nested(path: str, annotation: Any, metadata: list[Any]) -> Iterator[tuple[str, Any, str]]:
    tag = next((m.tag for m in metadata if isinstance(m, Tag)), None)
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        yield from _nested(path, inner, [*metadata, *extra])
    elif origin in (Union, UnionType):
        for arg in get_args(annotation):
            yield from _nested(path, arg, [])
    elif origin is list:
        yield from _nested(f"{path}[]", get_args(annotation)[0], [])
    elif origin is dict:
        yield from _nested(f"{path}.<key>", get_args(annotation)[1], [])
    elif inspect.isclass(annotation) and issubclass(annotation, Spec):
        yield path, annotation, _label(annotation, tag)


def _label(spec: type[Spec], tag: str | None) -> str:
    provider = spec.model_fields.get("provider")
    if provider is not None:
        return f"provider: {get_args(provider.annotation)[0]}"
    if tag is not None:
        return tag.removeprefix(schema.TAG_PREFIX)
    return ""


def type_name(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A YAML reader's name for a field type: ``list of string``, ``number | null``."""
    for item in metadata or []:
        if isinstance(item, AfterValidator) and item.func in _VALIDATED:
            return _VALIDATED[item.func]
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return type_name(inner, [*extra, *(metadata or [])])
    if origin in (Union, UnionType):
        args = get_args(annotation)
        names = [type_name(a) for a in args if a is not type(None)]
        if all(inspect.isclass(_strip(a)) and issubclass(_strip(a), Spec)
               for a in args if a is not type(None)) and len(names) > 1:
            return "one of: " + ", ".join(names)
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping {type_name(key)} → {type_name(value)}"
    if origin is Literal:
        return " or ".join(f"`{v}`" for v in get_args(annotation))
    if inspect.isclass(annotation) and issubclass(annotation, Spec):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _strip(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, Spec):
        return "its defaults"
    return f"`{json.dumps(value)}`"


# The annotated-types constraints pydantic puts in field metadata (Ge, Gt, Le, MinLen...),
# by the attribute each carries.
_BOUNDS = (("ge", "≥ {}"), ("gt", "> {}"), ("le", "≤ {}"), ("lt", "< {}"),
           ("min_length", "at least {}"), ("max_length", "at most {}"))


def constraints(field: FieldInfo) -> str:
    parts = [text.format(getattr(item, attr)) for item in field.metadata
             for attr, text in _BOUNDS if getattr(item, attr, None) is not None]
    return ", ".join(parts)


def _description_key(spec: type[Spec], name: str) -> str:
    """The class that declares the field (inherited fields are described once)."""
    for cls in spec.__mro__:
        if name in getattr(cls, "__annotations__", {}):
            return f"{cls.__name__}.{name}"
    return f"{spec.__name__}.{name}"


def missing_descriptions() -> list[str]:
    """Fields of the schema with no entry in DESCRIPTIONS (a test keeps this empty)."""
    return sorted({_description_key(s.spec, name) for s in sections()
                   for name in s.spec.model_fields} - DESCRIPTIONS.keys())


def stale_descriptions() -> list[str]:
    """Entries in DESCRIPTIONS that name no field any more."""
    keys = {_description_key(s.spec, name) for s in sections() for name in s.spec.model_fields}
    return sorted(DESCRIPTIONS.keys() - keys)


def render() -> str:
    out = [
        "# Workflow file reference",
        "",
        "<!-- Generated from src/alpaca_engine/workflows/schema.py by",
        "     `uv run python -m alpaca_engine.workflows.reference > docs/workflow-reference.md`;",
        "     tests/unit/test_workflow_reference.py fails when this file is out of date. -->",
        "",
        "A workflow file is YAML (version 1). Every mapping rejects unknown fields, and values",
        "are strict: `\"10\"` is not a number. Errors name the file, the line and the field.",
        "*unset* means the field may be left out (or `null`) and the engine then uses the value",
        "the description gives.",
    ]
    for section in sections():
        spec = section.spec
        title = f"`{section.path}`" if section.path else "The document"
        label = f" ({section.label})" if section.label and section.path else ""
        out += ["", f'<a id="{spec.__name__.lower()}"></a>', "",
                f"## {title}{label}", ""]
        doc = inspect.getdoc(spec)
        if doc and spec.__doc__ is not None and "__doc__" in spec.__dict__:
            out += [" ".join(doc.split()).replace("``", "`"), ""]
        out += ["| field | type | default | constraint | meaning |", "|---|---|---|---|---|"]
        for name, field in spec.model_fields.items():
            meaning = DESCRIPTIONS.get(_description_key(spec, name), "")
            out.append(f"| `{name}` | {type_name(field.annotation, field.metadata)} | "
                       f"{default_text(field)} | {constraints(field)} | {meaning} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover - the test calls render()
    sys.stdout.write(render())

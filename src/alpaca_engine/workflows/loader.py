"""Load a workflow file (YAML, version 1) into a ``Workflow``.

Errors name the file, the line and the field: the document is composed into a node tree first
(with the safe loader, so no tag can run code), and every error location, from pydantic or from
the checks made here, is walked down that tree to the node it is about.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.resources
import importlib.util
import inspect
import json
import re
import sys
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ..agents import Agent, ApprovalPolicy, HistoryPolicy
from ..models.base import Model
from ..tools.base import Tool
from ..tools.decorator import make_tool
from ..tools.http import ClientFactory, HttpConfigError, make_http_tool
from ..tools.registry import ToolRegistry
from ..tools.retry import NO_RETRY
from ..workflow import Workflow
from .models import build_model
from .schema import (
    TAG_PREFIX,
    AgentSpec,
    GovernedSpec,
    HttpToolEntry,
    Loc,
    McpToolEntry,
    SpecError,
    ToolEntry,
    WorkflowError,
    WorkflowSpec,
    fields_at,
)

__all__ = ["Diagnosis", "Rules", "WorkflowError", "diagnose_workflow_text", "load_workflow",
           "load_workflow_text", "resolve_workflow"]

BUILTIN_PACKAGE = "alpaca_engine.examples_builtin"
BUILTIN_PREFIX = "builtin:"
_BUILTIN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_GLOB_CHARS = frozenset("*?[")
_MAX_NODES = 100_000


# -- public API --------------------------------------------------------------------------------


def load_workflow(path: str | Path) -> Workflow:
    """Load a workflow file; its ``ref`` is the absolute path, so other processes find it."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkflowError(str(path), None, "", f"cannot read the file: {exc}") from None
    absolute = file.resolve()
    return load_workflow_text(text, source=str(path), base_dir=absolute.parent, ref=str(absolute))


def load_workflow_text(
    text: str,
    *,
    source: str = "<string>",
    base_dir: Path | None = None,
    ref: str | None = None,
    rules: Rules | None = None,
) -> Workflow:
    """Load a workflow from YAML text; ``base_dir`` is where ``module:attr`` looks first."""
    return _Loader(source, _Importer(base_dir=base_dir), rules).load(text, ref or source)


def diagnose_workflow_text(
    text: str,
    *,
    source: str = "<string>",
    ref: str | None = None,
    rules: Rules | None = None,
) -> Diagnosis:
    """Every error (and warning) of a workflow text at once, each with its field and line;
    modules resolve on the normal import path only (there is no directory next to it)."""
    return _Loader(source, _Importer(), rules).diagnose(text, ref or source)


_cache: dict[str, tuple[int, Workflow]] = {}
_cache_lock = threading.Lock()


def resolve_workflow(ref: str) -> Workflow:
    """The workflow a ``ref`` names: a file path (cached until it changes) or ``builtin:NAME``."""
    if ref.startswith(BUILTIN_PREFIX):
        key, stamp = ref, 0  # builtins ship with the package and do not change under us
    else:
        path = Path(ref).resolve()
        try:
            stamp = path.stat().st_mtime_ns
        except OSError as exc:
            raise WorkflowError(ref, None, "", f"cannot read the file: {exc}") from None
        key = str(path)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    workflow = _load_builtin(ref) if ref.startswith(BUILTIN_PREFIX) else load_workflow(ref)
    with _cache_lock:
        _cache[key] = (stamp, workflow)
    return workflow


def _load_builtin(ref: str) -> Workflow:
    name = ref[len(BUILTIN_PREFIX):]
    if not _BUILTIN_NAME.fullmatch(name):
        raise WorkflowError(ref, None, "", "a builtin name is letters, digits, '-' and '_'")
    try:
        package = importlib.resources.files(BUILTIN_PACKAGE)
    except ModuleNotFoundError:
        raise WorkflowError(
            ref, None, "", f"no builtin workflows are installed (package {BUILTIN_PACKAGE})"
        ) from None
    resource = package / f"{name}.yaml"
    if not resource.is_file():
        known = sorted(
            entry.name.removesuffix(".yaml")
            for entry in package.iterdir()
            if entry.name.endswith(".yaml")
        )
        raise WorkflowError(
            ref, None, "", f"no builtin workflow {name!r} (known: {', '.join(known) or 'none'})"
        )
    text = resource.read_text(encoding="utf-8")
    # Modules named in a builtin resolve inside the package, never through sys.path.
    loader = _Loader(f"{BUILTIN_PREFIX}{name}.yaml", _Importer(package=BUILTIN_PACKAGE))
    return loader.load(text, ref)


# -- importing module:attribute ----------------------------------------------------------------


class _Importer:
    """Resolves ``module:attribute`` next to the workflow first, then on the normal path."""

    def __init__(self, *, base_dir: Path | None = None, package: str | None = None) -> None:
        self.base_dir = base_dir.resolve() if base_dir is not None else None
        self.package = package

    def resolve(self, target: str) -> Any:
        module_name, _, attr_path = target.partition(":")
        obj: Any = self._module(module_name)
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise SpecError((), f"module {module_name!r} has no attribute {attr_path!r}") \
                    from None
        return obj

    def _module(self, name: str) -> ModuleType:
        if self.package is not None:
            qualified = f"{self.package}.{name}"
            if _find_spec(qualified) is not None:
                return _import(qualified)
        if self.base_dir is not None and self._is_local(name):
            return self._local(name)
        return _import(name)

    def _is_local(self, name: str) -> bool:
        assert self.base_dir is not None
        top = name.split(".")[0]
        return (self.base_dir / f"{top}.py").is_file() or (
            self.base_dir / top / "__init__.py"
        ).is_file()

    def _local(self, name: str) -> ModuleType:
        assert self.base_dir is not None
        directory = str(self.base_dir)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        module = _import(name)
        if _defined_under(module, self.base_dir):
            return module
        # The name is taken by another module (an earlier workflow's ``tools.py``, a stdlib
        # module): load the file next to this workflow under a private name instead.
        file = self.base_dir / f"{name}.py"
        if "." in name or not file.is_file():
            raise SpecError(
                (), f"module {name!r} is already imported from {module.__file__}; "
                "rename the module next to the workflow",
            )
        return _import_file(file, name)


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise SpecError((), f"cannot import module {name!r}: {type(exc).__name__}: {exc}") \
            from None


def _defined_under(module: ModuleType, directory: Path) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().is_relative_to(directory)


def _import_file(file: Path, name: str) -> ModuleType:
    digest = hashlib.sha1(str(file).encode(), usedforsecurity=False).hexdigest()[:12]
    private = f"_alpaca_workflow_{digest}_{name}"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.spec_from_file_location(private, file)
    if spec is None or spec.loader is None:
        raise SpecError((), f"cannot import module {name!r} from {file}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and get_type_hints look the module up by name.
    sys.modules[private] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[private]
        raise SpecError((), f"cannot import module {name!r}: {type(exc).__name__}: {exc}") \
            from None
    return module


# -- the loader --------------------------------------------------------------------------------


class Rules(Protocol):
    """Extra checks for workflows that come from outside the server (workflows/policy.py).

    The loader asks them at each phase and builds nothing they refused (no import, no
    connection), so one code path serves files, validation and pushed workflows.
    """

    def check_document(self, data: Any) -> list[tuple[Loc, str]]:
        """Problems of the parsed document as a whole (literal secrets ...)."""

    def check_spec(self, spec: WorkflowSpec) -> list[tuple[Loc, str]]:
        """Problems of the validated spec (what it may reference); located entries are
        not built."""

    def check_url(self, url: str) -> str | None:
        """Why a server the loader is about to connect to is refused, or None."""

    def http_client(self) -> ClientFactory | None:
        """The client HTTP tools call through (None: the default)."""


@dataclass
class Diagnosis:
    """Everything found in one document: errors, warnings, and the workflow when none."""

    errors: list[WorkflowError] = dataclasses.field(default_factory=list)
    warnings: list[WorkflowError] = dataclasses.field(default_factory=list)
    workflow: Workflow | None = None
    spec: WorkflowSpec | None = None
    data: Any = None
    """The parsed document (None when it did not parse)."""

    def raise_first(self) -> None:
        """Raise the first error, counting the others, as a file load reports it."""
        if not self.errors:
            return
        first = self.errors[0]
        others = len(self.errors) - 1
        message = first.message
        if others:
            message += f" (and {others} more error{'s' if others > 1 else ''})"
        raise WorkflowError(first.source, first.line, first.field, message)


_Refused = frozenset[Loc]


class _Loader:
    def __init__(self, source: str, importer: _Importer, rules: Rules | None = None) -> None:
        self.source = source
        self.importer = importer
        self.rules = rules
        self.root: yaml.Node | None = None
        self.errors: list[WorkflowError] = []
        self.python_paths: dict[str, str] = {}
        self.model_functions: set[str] = set()

    def load(self, text: str, ref: str) -> Workflow:
        found = self.diagnose(text, ref)
        found.raise_first()
        assert found.workflow is not None
        return found.workflow

    def diagnose(self, text: str, ref: str) -> Diagnosis:
        """Parse, validate and build, collecting every error instead of stopping at one."""
        try:
            data = self._parse(text)
        except WorkflowError as exc:
            return Diagnosis(errors=[exc])
        problems = self.rules.check_document(data) if self.rules is not None else []
        self._report(problems)
        spec = self._validate(data)
        if spec is None:
            return Diagnosis(errors=self.errors, data=data)
        if self.rules is not None:
            spec_problems = self.rules.check_spec(spec)
            self._report(spec_problems)
            problems += spec_problems
        # An entry or model with a reported problem is not built: nothing refused is
        # imported or connected, and its problem is not reported twice.
        refused: _Refused = frozenset(loc[:3] if loc[:1] == ("agents",) else loc[:2]
                                      for loc, _ in problems)
        tools, failed = self._tools(spec, refused)
        agents = self._agents(spec, tools, refused, failed)
        warnings = [self._error(loc, message) for loc, message in delegation_cycles(spec)]
        if self.errors:
            return Diagnosis(errors=self.errors, warnings=warnings, spec=spec, data=data)
        budget = spec.defaults.budget.model_dump(exclude_none=True)
        prices = {name: (p.input, p.output) for name, p in spec.defaults.prices.items()}
        workflow = Workflow(ref=ref, agents=agents, tools=tools,
                            max_depth=spec.defaults.max_depth, budget=budget, prices=prices,
                            python_paths=dict(self.python_paths),
                            model_functions=frozenset(self.model_functions))
        return Diagnosis(warnings=warnings, workflow=workflow, spec=spec, data=data)

    def _report(self, problems: list[tuple[Loc, str]]) -> None:
        self.errors += [self._error(loc, message) for loc, message in problems]

    # -- parsing and validation ----------------------------------------------------------------

    def _parse(self, text: str) -> Any:
        try:
            return self._parse_yaml(text)
        except WorkflowError:
            if "\t" not in text or not _is_json(text):
                raise
        # JSON is YAML, except that JSON may indent with tabs; in valid JSON a raw tab can
        # only be whitespace (strings escape it), so spaces keep every line where it was.
        return self._parse_yaml(text.replace("\t", " "))

    def _parse_yaml(self, text: str) -> Any:
        loader: yaml.SafeLoader | None = None
        try:
            loader = yaml.SafeLoader(text)  # the reader already refuses control characters
            self.root = loader.get_single_node()
            if self.root is None:
                raise WorkflowError(self.source, None, "", "the workflow is empty")
            _check_tree(self.root, self.source)
            return loader.construct_document(self.root)
        except yaml.MarkedYAMLError as exc:
            raise self._yaml_error(exc) from None
        except yaml.YAMLError as exc:
            raise WorkflowError(self.source, None, "", f"invalid YAML: {exc}") from None
        except RecursionError:
            raise WorkflowError(self.source, None, "", "the document is nested too deeply") \
                from None
        finally:
            if loader is not None:
                loader.dispose()

    def _yaml_error(self, exc: yaml.MarkedYAMLError) -> WorkflowError:
        mark = exc.problem_mark or exc.context_mark
        message = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            message += f" ({exc.context} on line {exc.context_mark.line + 1})"
        return WorkflowError(self.source, mark.line + 1 if mark else None, "",
                             f"invalid YAML: {message}")

    def _validate(self, data: Any) -> WorkflowSpec | None:
        """The spec, or None with every schema error reported (the most telling first)."""
        try:
            return WorkflowSpec.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        first = _most_telling(errors)
        for error in [first, *(e for e in errors if e is not first)]:
            loc: Loc = tuple(error["loc"])
            if error["type"] == "invalid_provider" and isinstance(error["input"], dict):
                loc = (*loc, "provider")  # the model is a mapping: its provider key is wrong
            self.errors.append(self._error(loc, _message(error)))
        return None

    def _error(self, loc: Loc, message: str) -> WorkflowError:
        field, line = locate(self.root, loc)
        return WorkflowError(self.source, line, field, message)

    def _fail(self, exc: SpecError) -> None:
        self.errors.append(self._error(exc.loc, exc.message))

    # -- building ------------------------------------------------------------------------------

    def _tools(self, spec: WorkflowSpec, refused: _Refused) -> tuple[ToolRegistry, list[str]]:
        """The registry of every tool that built, and name patterns of the entries that did
        not (so agents naming them get no second, misleading "unknown tool")."""
        registry = ToolRegistry()
        failed: list[str] = []
        first_at: dict[str, int] = {}
        for index, entry in enumerate(spec.tools):
            if ("tools", index) in refused:
                failed.append(_names_of(entry))
                continue
            try:
                built = self._entry_tools(entry)
            except SpecError as exc:
                self._fail(exc.within("tools", index))
                failed.append(_names_of(entry))
                continue
            for tool in built:
                if tool.name in first_at:
                    first_line = locate(self.root, ("tools", first_at[tool.name]))[1]
                    self._fail(SpecError(("tools", index, *_name_field(entry)),
                                         f"duplicate tool name {tool.name!r} (first defined on "
                                         f"line {first_line})"))
                    continue
                first_at[tool.name] = index
                registry.register(tool)
        return registry, failed

    def _entry_tools(self, entry: ToolEntry | HttpToolEntry | McpToolEntry) -> list[Tool]:
        if isinstance(entry, HttpToolEntry):
            client = self.rules.http_client() if self.rules is not None else None
            return [_http_tool(entry, client)]
        if isinstance(entry, McpToolEntry):
            return self._mcp_tools(entry)
        return [self._tool(entry)]

    def _mcp_tools(self, entry: McpToolEntry) -> list[Tool]:
        """Start the server once to learn its tools: the registry must be complete at load."""
        # Imported here: the MCP SDK is slow to import and most workflows do not use it.
        from ..tools.mcp import MCPConfigError, MCPServer, McpTool, load_mcp_tools_sync

        spec = entry.mcp
        cwd: Path | None = None
        if spec.command is not None:
            # A stdio server runs next to the workflow file, as its python modules are found.
            base = self.importer.base_dir
            cwd = Path(spec.cwd) if spec.cwd is not None else base
            if cwd is not None and not cwd.is_absolute() and base is not None:
                cwd = base / cwd
            if cwd is not None and not cwd.is_dir():
                raise SpecError(("mcp", "cwd"), f"no such directory: {cwd}")
        if spec.url is not None and self.rules is not None:
            refusal = self.rules.check_url(spec.url)
            if refusal is not None:
                raise SpecError(("mcp", "url"), refusal)
        try:
            server = MCPServer(spec.server, command=spec.command, env=spec.env, cwd=cwd,
                               url=spec.url, headers=spec.headers, prefix=spec.prefix,
                               connect_timeout=spec.connect_timeout)
        except MCPConfigError as exc:
            raise SpecError(("mcp", *exc.loc), exc.message) from None
        try:
            tools = load_mcp_tools_sync(server)
        except Exception as exc:
            where = "command" if spec.command is not None else "url"
            raise SpecError(("mcp", where), str(exc) or type(exc).__name__) from None
        remote = {t.name: t.remote_name for t in tools if isinstance(t, McpTool)}
        known = ", ".join(sorted(remote.values())) or "none"
        for field, patterns in (("include", entry.include or []), ("exclude", entry.exclude)):
            for index, pattern in enumerate(patterns):
                if not any(fnmatchcase(name, pattern) for name in remote.values()):
                    raise SpecError((field, index), f"{pattern!r} matches no tool of MCP server "
                                                    f"{spec.server!r} (it has: {known})")
        policies = _policies(entry)
        return [
            dataclasses.replace(tool, **policies) for tool in tools
            if (entry.include is None
                or any(fnmatchcase(remote[tool.name], p) for p in entry.include))
            and not any(fnmatchcase(remote[tool.name], p) for p in entry.exclude)
        ]

    def _tool(self, entry: ToolEntry) -> Tool:
        try:
            target = self.importer.resolve(entry.python)
        except SpecError as exc:
            raise exc.within("python") from None
        overrides = _overrides(entry)
        if isinstance(target, Tool):
            # YAML wins over what @tool said, field by field; the rest is kept.
            tool = dataclasses.replace(target, **overrides)
        elif inspect.isclass(target) or not callable(target):
            raise SpecError(("python",), f"{entry.python!r} is neither a Tool nor a function")
        else:
            try:
                tool = make_tool(target, **overrides)
            except Exception as exc:
                raise SpecError(("python",), f"cannot derive a tool from {entry.python!r}: "
                                             f"{type(exc).__name__}: {exc}") from None
        self.python_paths[entry.python] = tool.name
        return tool

    def _agents(self, spec: WorkflowSpec, tools: ToolRegistry, refused: _Refused,
                failed: list[str]) -> dict[str, Agent]:
        names: dict[str, int] = {}
        for index, agent in enumerate(spec.agents):
            if agent.name in names:
                first_line = locate(self.root, ("agents", names[agent.name]))[1]
                self._fail(SpecError(("agents", index, "name"),
                                     f"duplicate agent name {agent.name!r} (first defined on "
                                     f"line {first_line})"))
                continue
            names[agent.name] = index
        agents: dict[str, Agent] = {}
        for index, agent_spec in enumerate(spec.agents):
            before = len(self.errors)
            for problem in _references(agent_spec, tools, names, failed):
                self._fail(problem.within("agents", index))
            if ("agents", index, "model") in refused:
                continue
            try:
                model = build_model(agent_spec.model, self._resolve_function)
            except SpecError as exc:
                self._fail(exc.within("agents", index, "model"))
                continue
            if len(self.errors) == before and agent_spec.name not in agents:
                agents[agent_spec.name] = _agent(agent_spec, model)
        return agents

    def _resolve_function(self, target: str) -> Any:
        found = self.importer.resolve(target)
        self.model_functions.add(target)
        return found


def _references(spec: AgentSpec, tools: ToolRegistry, agents: dict[str, int],
                failed: list[str]) -> list[SpecError]:
    """What an agent names that does not exist: tools, delegates, gated delegations."""
    problems = []
    for index, name in enumerate(spec.tools):
        # A glob may match nothing yet; an exact name that matches nothing is a typo.
        if not _GLOB_CHARS.intersection(name) and name not in tools \
                and not any(fnmatchcase(name, pattern) for pattern in failed):
            problems.append(SpecError(("tools", index),
                                      f"unknown tool {name!r}{_suggest(name, tools.names())}"))
    for index, name in enumerate(spec.delegates_to):
        if name == spec.name:
            problems.append(SpecError(("delegates_to", index),
                                      "an agent cannot delegate to itself (the engine refuses "
                                      "it as a cycle at run time)"))
        elif name not in agents:
            problems.append(SpecError(("delegates_to", index),
                                      f"unknown agent {name!r}{_suggest(name, list(agents))}"))
    for index, name in enumerate(spec.approval.delegations):
        if name not in spec.delegates_to:
            problems.append(SpecError(("approval", "delegations", index),
                                      f"{name!r} is not in delegates_to"))
    return problems


def _agent(spec: AgentSpec, model: Model) -> Agent:
    return Agent(
        name=spec.name,
        model=model,
        instructions=spec.instructions,
        output_schema=spec.output_schema,
        output_retries=spec.output_retries,
        tools=list(spec.tools),
        capabilities=frozenset(spec.capabilities) if spec.capabilities is not None else None,
        delegates_to=list(spec.delegates_to),
        max_steps=spec.limits.max_steps,
        description=spec.description,
        approval=ApprovalPolicy(
            tools=tuple(spec.approval.tools),
            capabilities=tuple(spec.approval.capabilities),
            delegations=tuple(spec.approval.delegations),
            cost_above=spec.approval.cost_above,
            on_reject=spec.approval.on_reject,
            expires_after=spec.approval.expires_after,
            on_expiry=spec.approval.on_expiry,
        ),
        budget={k: float(v) for k, v in
                spec.limits.budget.model_dump(exclude_none=True).items()},
        max_output_tokens=spec.limits.max_output_tokens,
        history=HistoryPolicy(max_turns=spec.history.max_turns,
                              max_tokens=spec.history.max_tokens),
    )


def delegation_cycles(spec: WorkflowSpec) -> list[tuple[Loc, str]]:
    """Delegation edges that close a cycle longer than one agent (A -> B -> A), each once.

    Not an error: which agent is the root decides which edge the engine refuses at run time
    (``cycle_detected``), and either agent may be an entry point. Self-delegation is an error
    (see _references).
    """
    edges = {a.name: [d for d in a.delegates_to if d != a.name] for a in spec.agents}
    index = {a.name: i for i, a in enumerate(spec.agents)}
    found: list[tuple[Loc, str]] = []
    reported: set[frozenset[str]] = set()
    for start in edges:
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for position, nxt in enumerate(edges.get(node, [])):
                if nxt == start:
                    members = frozenset(path)
                    if members not in reported:
                        reported.add(members)
                        loc: Loc = ("agents", index[node], "delegates_to", position)
                        found.append((loc, "delegation cycle " + " -> ".join([*path, start])
                                      + ": the engine refuses the delegation that closes it "
                                      "at run time (cycle_detected)"))
                elif nxt not in path and nxt in edges:
                    stack.append((nxt, [*path, nxt]))
    return found


def _names_of(entry: ToolEntry | HttpToolEntry | McpToolEntry) -> str:
    """A glob for the tool names an entry would have registered."""
    if isinstance(entry, McpToolEntry):
        prefix = entry.mcp.prefix if entry.mcp.prefix is not None else f"{entry.mcp.server}_"
        return f"{prefix}*"
    if isinstance(entry, HttpToolEntry) or entry.name is not None:
        return str(entry.name)
    return entry.python.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


# -- mapping locations onto the YAML node tree -------------------------------------------------


def locate(root: yaml.Node | None, loc: Loc) -> tuple[str, int | None]:
    """The dotted field and 1-based line for ``loc``, as deep as the document goes.

    Lines are those of mapping keys and list items, so an error about a whole block points at
    the line that names it. A last key missing from its mapping (a required field) is still
    named, at the line of that mapping.
    """
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    path: list[str | int] = []
    parts = [p for p in loc if not (isinstance(p, str) and p.startswith(TAG_PREFIX))]
    for position, part in enumerate(parts):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            found = _lookup(node, part)
            if found is not None:
                key, node = found
                path.append(part)
                line = key.start_mark.line + 1
                continue
            if position == len(parts) - 1:
                path.append(part)
        elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
              and 0 <= part < len(node.value)):
            node = node.value[part]
            path.append(part)
            line = node.start_mark.line + 1
            continue
        break
    return _dotted(path), line


def _lookup(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _dotted(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(root)"


def _check_tree(root: yaml.Node, source: str) -> None:
    """Refuse duplicate keys, which PyYAML would resolve silently by keeping the last, and
    alias bombs, which would expand into more data than any workflow needs."""
    sizes: dict[int, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> int:
        known = sizes.get(id(node))
        if known is not None:  # an alias: checked already, counts at its full size
            return known
        sizes[id(node)] = 1  # provisional, so a recursive alias ends the walk
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen and key != "<<":
                    raise WorkflowError(source, line, _dotted([*loc, key]),
                                        f"duplicate key {key!r} (first on line {seen[key]})")
                if isinstance(key, str):
                    seen[key] = line
                size += 1 + walk(value_node, (*loc, key) if isinstance(key, str) else loc)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                size += walk(item, (*loc, index))
        if size > _MAX_NODES:
            raise WorkflowError(source, node.start_mark.line + 1, _dotted(list(loc)),
                                f"the document expands to more than {_MAX_NODES} values "
                                "(through YAML aliases?)")
        sizes[id(node)] = size
        return size

    walk(root, ())


def _http_tool(entry: HttpToolEntry, client: ClientFactory | None = None) -> Tool:
    http = entry.http
    try:
        return make_http_tool(
            entry.name, method=http.method, url=http.url, headers=http.headers,
            input_schema=entry.input_schema, output_schema=entry.output_schema,
            description=entry.description, max_response_bytes=http.max_response_bytes,
            max_text_chars=http.max_text_chars, client_factory=client, **_policies(entry),
        )
    except HttpConfigError as exc:
        raise SpecError(exc.loc, exc.message) from None


def _name_field(entry: ToolEntry | HttpToolEntry | McpToolEntry) -> Loc:
    """Where an entry gets its tools' names from, for the duplicate-name error."""
    if isinstance(entry, McpToolEntry):
        return ("mcp", "server")
    return ("name",) if "name" in entry.model_fields_set else ("python",)


def _overrides(entry: ToolEntry) -> dict[str, Any]:
    """The Tool fields this entry sets; ``null`` means "none" where the field allows it."""
    out: dict[str, Any] = {}
    fields = entry.model_fields_set
    for name in ("name", "description"):
        if name in fields and getattr(entry, name) is not None:
            out[name] = getattr(entry, name)
    return out | _policies(entry)


def _policies(entry: GovernedSpec) -> dict[str, Any]:
    """The governance fields an entry sets (capabilities, retry, breaker, timeout, approval)."""
    out: dict[str, Any] = {}
    fields = entry.model_fields_set
    if "approval" in fields and entry.approval is not None:
        out["approval"] = entry.approval
    if "capabilities" in fields:
        out["capabilities"] = frozenset(entry.capabilities or ())
    if "retry" in fields:
        out["retry"] = entry.retry.to_policy() if entry.retry is not None else NO_RETRY
    if "breaker" in fields:
        out["breaker"] = entry.breaker.to_policy() if entry.breaker is not None else None
    if "timeout" in fields:
        out["timeout"] = entry.timeout
    if "cost" in fields and entry.cost is not None:
        out["cost"] = entry.cost
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _most_telling(errors: list[ErrorDetails]) -> ErrorDetails:
    """The first error, unless it is a missing field next to an unknown one: a typo is the
    likelier cause (``modle:`` both leaves ``model`` out and adds a field), so name that."""
    first = errors[0]
    if first["type"] == "missing":
        parent = first["loc"][:-1]
        for error in errors:
            if error["type"] == "extra_forbidden" and error["loc"][:-1] == parent:
                return error
    return first


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden" and loc and isinstance(loc[-1], str):
        known = fields_at(tuple(loc[:-1]))
        hint = _suggest(loc[-1], known) if known is not None else ""
        return f"unknown field {loc[-1]!r}{hint}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("model_type", "dict_type"):
        return "expected a mapping"
    if kind == "list_type":
        return "expected a list"
    return error["msg"].removeprefix("Value error, ")


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

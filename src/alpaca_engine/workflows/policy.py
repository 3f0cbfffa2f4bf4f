"""What a workflow pushed to the registry may reference (DESIGN §11), and the server's catalog.

A file on the server's disk was put there by the operator; a pushed workflow comes from a
builder over HTTP, so it may only *use* what the server offers, never bring anything:

* tools of the **catalog** (Python tools installed with the server: the ``Tool`` objects of
  the modules in ``ALPACA_TOOL_CATALOG``, default ``alpaca_engine.toolkit``, and the Python
  tools of the workflows this server serves), HTTP tools, and MCP servers over streamable
  HTTP. A ``python:`` path outside the catalog, a function model outside the served
  workflows' ones and ``mcp: {command: ...}`` (a local process) are refused, naming the field.
  A catalog tool keeps its name and may gain capabilities or an approval gate, never lose
  them: tenant policies refer to it by name and capability.
* secrets by ``${NAME}`` only, and only the names the operator lends to registered workflows
  (``ALPACA_REGISTRY_SECRETS``, comma-separated; none by default: every other variable of the
  server stays out of reach). A literal that looks like a secret anywhere in the document
  (``sk-...``, ``Bearer <literal>``, a literal under a secret-named key, a Slack webhook URL or
  token, a private key) is refused without being echoed.
* no private or loopback targets (HTTP tool URLs, MCP servers, OpenAI ``base_url``) unless the
  operator sets ``ALPACA_REGISTRY_ALLOW_PRIVATE=1``: literal addresses are refused here, names
  when an MCP server is connected, and every HTTP tool call goes through the SSRF guard of
  ``fetch_page`` (``toolkit/net.py``), pinned to the address it checked.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..telemetry.audit import is_secret_key
from ..telemetry.logging import redact_text
from ..toolkit.net import GuardedTransport, is_public_address
from ..tools.base import Tool
from ..tools.decorator import make_tool
from ..tools.http import ClientFactory
from ..workflow import Workflow
from .schema import (
    FunctionModelSpec,
    HttpToolEntry,
    Loc,
    McpToolEntry,
    OpenAIModelSpec,
    ToolEntry,
    WorkflowSpec,
)

__all__ = [
    "ALLOW_PRIVATE_ENV",
    "CATALOG_ENV",
    "DEFAULT_CATALOG_MODULES",
    "SECRETS_ENV",
    "Catalog",
    "RegistryRules",
    "build_catalog",
    "catalog_modules",
]

log = logging.getLogger("alpaca.registry")

ALLOW_PRIVATE_ENV = "ALPACA_REGISTRY_ALLOW_PRIVATE"
SECRETS_ENV = "ALPACA_REGISTRY_SECRETS"
CATALOG_ENV = "ALPACA_TOOL_CATALOG"
DEFAULT_CATALOG_MODULES = ("alpaca_engine.toolkit",)
DEFAULT_KEY_ENV = "OPENAI_API_KEY"

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_QUERY_PARAM = re.compile(r"[?&]([A-Za-z0-9_.-]+)=([^&#\s]+)")
_LITERAL_SECRETS = (
    re.compile(r"https://hooks\.slack\.com/(services|workflows)/\S+", re.I),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\b(ghp|gho|ghs|ghu)_[A-Za-z0-9]{20,}|\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
)


# -- the catalog -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The Python a registered workflow may name: tools by import path, model functions."""

    tools: Mapping[str, Tool] = field(default_factory=dict)
    functions: frozenset[str] = frozenset()


def build_catalog(served: Iterable[Workflow],
                  modules: Sequence[str] = DEFAULT_CATALOG_MODULES) -> Catalog:
    """The Tool objects of ``modules`` plus the Python tools and model functions of the served
    workflows, as an import (the way a worker loads a registered workflow) resolves them."""
    tools: dict[str, Tool] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            log.warning("tool catalog module %s does not import (%s: %s); left out",
                        name, type(exc).__name__, exc)
            continue
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, Tool) and not attr.startswith("_"):
                tools[f"{name}:{attr}"] = value
    functions: set[str] = set()
    for workflow in served:
        for path in workflow.python_paths:
            tool = _installed_tool(path)
            if tool is not None:
                tools.setdefault(path, tool)
        functions |= workflow.model_functions
    return Catalog(tools=dict(sorted(tools.items())), functions=frozenset(functions))


def catalog_modules() -> tuple[str, ...]:
    """``ALPACA_TOOL_CATALOG`` (comma-separated module names), or the toolkit."""
    raw = os.environ.get(CATALOG_ENV, "")
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    return names or DEFAULT_CATALOG_MODULES


def _installed_tool(path: str) -> Tool | None:
    """The tool ``module:attr`` is when imported by name, as a worker would (None when it
    cannot be: a module only found next to a served file is not installed)."""
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr_path.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, Tool) else make_tool(obj)
    except Exception:
        return None


# -- the rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryRules:
    """The loader's extra checks for a registered workflow (see the module docstring).

    ``catalog=None`` skips catalog membership: a stored version was checked when it was
    pushed and is immutable, and a worker has no served workflows to build a catalog from.
    """

    catalog: Catalog | None = None
    secrets: frozenset[str] = frozenset()
    allow_private: bool = False

    @classmethod
    def from_env(cls, catalog: Catalog | None = None) -> RegistryRules:
        raw = os.environ.get(SECRETS_ENV, "")
        names = frozenset(n.strip() for n in raw.split(",") if n.strip())
        flag = os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower()
        return cls(catalog=catalog, secrets=names,
                   allow_private=flag in {"1", "true", "yes", "on"})

    # -- the document ----------------------------------------------------------------------

    def check_document(self, data: Any) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        for loc, key, value in _strings(data):
            if key is not None and is_secret_key(key) and not _REF.search(value):
                problems.append((loc, f"a literal value under {key!r}: reference a secret as "
                                      "${NAME}, never write it into a workflow"))
            elif _looks_secret(value):
                problems.append((loc, "looks like a secret (an API key, token or webhook "
                                      "URL): reference it as ${NAME}, never write it into a "
                                      "workflow"))
        return problems

    # -- the spec --------------------------------------------------------------------------

    def check_spec(self, spec: WorkflowSpec) -> list[tuple[Loc, str]]:
        problems: list[tuple[Loc, str]] = []
        if spec.name is None:
            problems.append((("name",), "required to register a workflow: name: NAME (1-64 "
                                        "letters, digits, '_' or '-')"))
        for index, entry in enumerate(spec.tools):
            problems += [(("tools", index, *loc), message)
                         for loc, message in self._tool(entry)]
        for index, agent in enumerate(spec.agents):
            problems += [(("agents", index, "model", *loc), message)
                         for loc, message in self._model(agent.model)]
        return problems

    def _tool(self, entry: ToolEntry | HttpToolEntry | McpToolEntry) -> list[tuple[Loc, str]]:
        if isinstance(entry, HttpToolEntry):
            return [*self._address(("http", "url"), entry.http.url),
                    *self._refs(("http", "headers"), entry.http.headers)]
        if isinstance(entry, McpToolEntry):
            mcp = entry.mcp
            if mcp.command is not None:
                return [(("mcp", "command"), "a registered workflow cannot start a local "
                                             "process (a stdio MCP server); connect to an MCP "
                                             "server over streamable HTTP with url:")]
            assert mcp.url is not None
            return [*self._address(("mcp", "url"), mcp.url),
                    *self._refs(("mcp", "headers"), mcp.headers)]
        return self._catalog_tool(entry)

    def _catalog_tool(self, entry: ToolEntry) -> list[tuple[Loc, str]]:
        if self.catalog is None:
            return []
        base = self.catalog.tools.get(entry.python)
        if base is None:
            return [(("python",), f"{entry.python!r} is not in this server's tool catalog "
                                  "(GET /v1/tools lists it): a registered workflow cannot bring "
                                  "Python code; use a catalog tool, an HTTP tool or an MCP "
                                  "server over HTTP")]
        problems: list[tuple[Loc, str]] = []
        if entry.name is not None and entry.name != base.name:
            problems.append((("name",), f"a catalog tool keeps its name {base.name!r} (tenant "
                                        "policies and allowlists refer to it)"))
        if "capabilities" in entry.model_fields_set:
            dropped = sorted(base.capabilities - set(entry.capabilities or ()))
            if dropped:
                problems.append((("capabilities",), "a registered workflow may add capabilities "
                                                    "to a catalog tool, not drop "
                                                    f"{', '.join(dropped)}"))
        if entry.approval == "never" and base.approval == "required":
            problems.append((("approval",), f"catalog tool {base.name!r} requires approval; a "
                                            "registered workflow cannot switch it off"))
        return problems

    def _model(self, model: Any) -> list[tuple[Loc, str]]:
        if isinstance(model, FunctionModelSpec):
            if self.catalog is not None and model.function not in self.catalog.functions:
                return [(("function",), f"{model.function!r} is not a model function of this "
                                        "server (only those of the workflows it serves are): a "
                                        "registered workflow cannot bring Python code; use "
                                        "provider openai or scripted")]
            return []
        if not isinstance(model, OpenAIModelSpec):
            return []
        problems: list[tuple[Loc, str]] = []
        lent = model.api_key_env in self.secrets
        if model.api_key_env != DEFAULT_KEY_ENV and not lent:
            problems.append((("api_key_env",), self._not_lent(model.api_key_env)))
        if model.base_url is not None:
            problems += self._address(("base_url",), model.base_url)
            if not lent:
                problems.append((("base_url",), f"would send the server's {model.api_key_env} "
                                                "to a host this workflow chose; the operator "
                                                f"must lend it first ({SECRETS_ENV})"))
        return problems

    def _refs(self, loc: Loc, headers: Mapping[str, str]) -> list[tuple[Loc, str]]:
        return [((*loc, name), self._not_lent(ref)) for name, value in headers.items()
                for ref in _REF.findall(value) if ref not in self.secrets]

    @staticmethod
    def _not_lent(name: str) -> str:
        return (f"${{{name}}} is not a secret this server lends to registered workflows "
                f"(the operator lists those in {SECRETS_ENV})")

    def _address(self, loc: Loc, url: str) -> list[tuple[Loc, str]]:
        """Literal private hosts are refused now; names are checked when used."""
        if self.allow_private:
            return []
        try:
            host = httpx.URL(url).host
        except (httpx.InvalidURL, ValueError):
            return []  # the schema or the tool builder reports a malformed URL
        if _is_private_literal(host):
            return [(loc, self._private(host))]
        return []

    @staticmethod
    def _private(host: str) -> str:
        return (f"{host!r} is a private or loopback address: set {ALLOW_PRIVATE_ENV}=1 on the "
                "server to allow private networks")

    # -- while loading ---------------------------------------------------------------------

    def check_url(self, url: str) -> str | None:
        """Resolve the host of a server about to be connected and refuse a private one."""
        if self.allow_private:
            return None
        try:
            parsed = httpx.URL(url)
            infos = socket.getaddrinfo(parsed.host, parsed.port or 443, type=socket.SOCK_STREAM)
        except (httpx.InvalidURL, ValueError, OSError):
            return None  # unresolvable: connecting reports it
        for *_rest, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not is_public_address(ip):
                return self._private(parsed.host)
        return None

    def http_client(self) -> ClientFactory:
        allow = self.allow_private

        def client() -> httpx.AsyncClient:
            # No redirects (as for every HTTP tool), no proxies from the environment: the
            # guard must see the address the connection really goes to.
            return httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                     transport=GuardedTransport(lambda: allow,
                                                                ALLOW_PRIVATE_ENV))
        return client


def _strings(data: Any, loc: Loc = (), key: str | None = None
             ) -> Iterator[tuple[Loc, str | None, str]]:
    """Every string of the document with its location and the mapping key it sits under."""
    if isinstance(data, str):
        yield loc, key, data
    elif isinstance(data, Mapping):
        for k, value in data.items():
            yield from _strings(value, (*loc, str(k)), str(k))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            yield from _strings(item, (*loc, index), None)


def _looks_secret(value: str) -> bool:
    if redact_text(value) != value or any(p.search(value) for p in _LITERAL_SECRETS):
        return True
    # a credential in a query string: ?api_key=abc (a {placeholder} is the model's argument)
    return any(is_secret_key(name) and not literal.startswith("{")
               for name, literal in _QUERY_PARAM.findall(value))


def _is_private_literal(host: str) -> bool:
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return not is_public_address(ipaddress.ip_address(name))
    except ValueError:
        return False  # a name: resolved (and checked) when it is used

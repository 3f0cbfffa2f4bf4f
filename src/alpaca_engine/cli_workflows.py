"""``alpaca workflows push|list|show|validate|graph``: registered workflows (DESIGN §11).

Against a server with ``--url`` (or ``ALPACA_URL``) and ``--key`` (or ``ALPACA_API_KEY``),
through the HTTP API; without one, against the local store (``--db``), as tenant ``--tenant``
(default ``local``, the tenant of a server without keys). Locally, pushed workflows may use
the tool catalog (``ALPACA_TOOL_CATALOG``) and the builtin workflows' tools. Both paths print
the same JSON with ``--json``. Exit codes: 0 ok, 1 an error (an invalid workflow included).
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

import httpx
import typer
from rich.console import Console
from rich.table import Table

from .config import Settings
from .errors import NotFound
from .store.factory import make_store
from .workflows.graph import workflow_graph
from .workflows.loader import resolve_workflow
from .workflows.policy import build_catalog, catalog_modules
from .workflows.registry import WorkflowRegistry, WorkflowRejected, parse_name
from .workflows.schema import WorkflowError

workflows_app = typer.Typer(help="Workflows registered from a builder: push, list, show, "
                                 "validate and draw them.", no_args_is_help=True)

console = Console()
err_console = Console(stderr=True)

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="ALPACA_URL", help="A server's base URL (default: the local store).")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", envvar="ALPACA_API_KEY", help="API key for --url (push needs builder or admin).")]
DbOpt = Annotated[str | None, typer.Option(
    "--db", envvar="ALPACA_DATABASE_URL", help="Local store (when no --url).")]
TenantOpt = Annotated[str, typer.Option(help="Local store: the tenant to act for.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print data as JSON.")]
FileArg = Annotated[Path, typer.Argument(help="A workflow file (YAML, or JSON by .json).",
                                         exists=True, dir_okay=False)]
LOCAL_SERVED = ("builtin:demo", "builtin:quickstart")


class Failed(Exception):
    """What to print before exiting 1; ``issues`` are a workflow's errors, one per line."""

    def __init__(self, message: str, issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.issues = issues or []


class Backend(Protocol):
    def push(self, text: str, fmt: str) -> dict[str, Any]: ...
    def validate(self, text: str, fmt: str) -> dict[str, Any]: ...
    def list(self) -> dict[str, Any]: ...
    def show(self, name: str, version: int | None) -> dict[str, Any]: ...
    def graph(self, name: str, version: int | None) -> dict[str, Any]: ...


# -- against a server --------------------------------------------------------------------------


class Remote:
    def __init__(self, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120)

    def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            response = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise Failed(f"cannot reach {self.client.base_url}: {type(exc).__name__}") from None
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise Failed(f"{method} {path}: HTTP {response.status_code} without a JSON body"
                         ) from None
        if response.status_code >= 400:
            raise Failed(str(body.get("detail") or body.get("title") or response.status_code),
                         body.get("errors"))
        return body

    @staticmethod
    def _content(fmt: str) -> dict[str, str]:
        return {"Content-Type": "application/json" if fmt == "json" else "application/yaml"}

    def push(self, text: str, fmt: str) -> dict[str, Any]:
        return self._call("POST", "/v1/workflows", content=text.encode(),
                          headers=self._content(fmt))

    def validate(self, text: str, fmt: str) -> dict[str, Any]:
        return self._call("POST", "/v1/workflows/validate", content=text.encode(),
                          headers=self._content(fmt))

    def list(self) -> dict[str, Any]:
        return self._call("GET", "/v1/workflows")

    def show(self, name: str, version: int | None) -> dict[str, Any]:
        if version is None:
            return self._call("GET", f"/v1/workflows/{name}")
        return self._call("GET", f"/v1/workflows/{name}/versions/{version}")

    def graph(self, name: str, version: int | None) -> dict[str, Any]:
        if version is None:
            return self._call("GET", f"/v1/workflows/{name}/graph")
        return self._call("GET", f"/v1/workflows/{name}/versions/{version}/graph")


# -- against the local store -------------------------------------------------------------------


class Local:
    """The same answers as the API, from the store directly (the API's response models)."""

    def __init__(self, db: str | None, tenant: str) -> None:
        self.settings = Settings()
        if db:
            self.settings.database_url = db
        self.tenant = tenant
        self.served = {name: resolve_workflow(name) for name in LOCAL_SERVED}

    def _run(self, body: Callable[[WorkflowRegistry], Any]) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            store = make_store(self.settings.database_url, self.settings.audit_key_bytes())
            await store.open()
            try:
                registry = WorkflowRegistry(store, catalog=build_catalog(
                    self.served.values(), catalog_modules()))
                result = await body(registry)
                return dict(result.model_dump(mode="json"))
            finally:
                await store.close()

        try:
            return asyncio.run(go())
        except WorkflowRejected as exc:
            raise Failed(f"the workflow has {len(exc.diagnosis.errors)} error(s); nothing was "
                         "stored", [_issue(e) for e in exc.diagnosis.errors]) from None
        except (NotFound, WorkflowError) as exc:
            raise Failed(str(exc)) from None

    def push(self, text: str, fmt: str) -> dict[str, Any]:
        from .api.models_workflows import WorkflowPushed

        async def go(registry: WorkflowRegistry) -> WorkflowPushed:
            record, created, found = await registry.push(self.tenant, text, fmt=fmt,
                                                         author=_author())
            return WorkflowPushed.of_push(record, created, found)

        return self._run(go)

    def validate(self, text: str, fmt: str) -> dict[str, Any]:
        from .api.models_workflows import WorkflowValidation

        async def go(registry: WorkflowRegistry) -> WorkflowValidation:
            return WorkflowValidation.of(await registry.validate(text))

        return self._run(go)

    def list(self) -> dict[str, Any]:
        from .api.models_workflows import WorkflowList, WorkflowSummary

        async def go(registry: WorkflowRegistry) -> WorkflowList:
            found = await registry.store.list_workflows(self.tenant)
            return WorkflowList(items=[
                *(WorkflowSummary.registered(r) for r in found),
                *(WorkflowSummary.served(n, w) for n, w in self.served.items())])

        return self._run(go)

    def show(self, name: str, version: int | None) -> dict[str, Any]:
        from .api.models_workflows import WorkflowDetail, WorkflowSummary, WorkflowVersion

        async def go(registry: WorkflowRegistry) -> WorkflowDetail | WorkflowVersion:
            if version is not None:
                record = await registry.store.get_workflow(self.tenant, name, version)
                return WorkflowVersion.of(record, source=True)
            versions = await registry.versions(self.tenant, name)
            loaded = await registry.resolve(self.tenant, f"{name}@{versions[0].version}")
            return WorkflowDetail(**WorkflowSummary.registered(versions[0]).model_dump(),
                                  versions=[WorkflowVersion.of(v) for v in versions],
                                  agents=list(loaded.agents))

        return self._run(go)

    def graph(self, name: str, version: int | None) -> dict[str, Any]:
        async def go(registry: WorkflowRegistry) -> Any:
            if name in self.served:
                return workflow_graph(self.served[name])
            ref = name if version is None else f"{name}@{version}"
            return workflow_graph(await registry.resolve(self.tenant, ref))

        return self._run(go)


def _author() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "cli"


def _issue(error: WorkflowError) -> dict[str, Any]:
    return {"path": error.field, "line": error.line, "message": error.message}


# -- commands ----------------------------------------------------------------------------------


def _backend(url: str | None, key: str | None, db: str | None, tenant: str) -> Backend:
    return Remote(url, key) if url else Local(db, tenant)


def _attempt(source: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Failed as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        for issue in exc.issues:
            _print_issue(source, issue, "error")
        raise typer.Exit(1) from None


def _print_issue(source: str, issue: dict[str, Any], kind: str) -> None:
    where = f"{source}:{issue['line']}" if issue.get("line") else source
    path = f" {issue['path']}:" if issue.get("path") else ""
    colour = "red" if kind == "error" else "yellow"
    err_console.print(f"[{colour}]{kind}[/{colour}] {where}:{path} {issue['message']}",
                      highlight=False, soft_wrap=True)


def _read(file: Path) -> tuple[str, str]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        err_console.print(f"[red]error:[/red] cannot read {file}: {exc}")
        raise typer.Exit(1) from None
    return text, "json" if file.suffix.lower() == ".json" else "yaml"


def _name(text: str) -> tuple[str, int | None]:
    if text in LOCAL_SERVED or text.startswith(("builtin:", "file:")):
        return text, None
    parsed = parse_name(text)
    if parsed is None:
        err_console.print(f"[red]error:[/red] {text!r} is not NAME or NAME@VERSION (a name is "
                          "1-64 letters, digits, '_' or '-')")
        raise typer.Exit(1)
    return parsed


def _dump(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@workflows_app.command("push")
def push(file: FileArg, url: UrlOpt = None, key: KeyOpt = None, db: DbOpt = None,
         tenant: TenantOpt = "local", as_json: JsonOpt = False) -> None:
    """Validate FILE and store it as the next version of the workflow it names."""
    text, fmt = _read(file)
    pushed = _attempt(str(file), lambda: _backend(url, key, db, tenant).push(text, fmt))
    if as_json:
        _dump(pushed)
        return
    for warning in pushed.get("warnings", []):
        _print_issue(str(file), warning, "warning")
    if pushed["created"]:
        console.print(f"pushed {pushed['name']} version {pushed['version']} "
                      f"({pushed['ref']})")
    else:
        console.print(f"{pushed['name']} version {pushed['version']} already has this content; "
                      "nothing new stored")


@workflows_app.command("validate")
def validate(file: FileArg, url: UrlOpt = None, key: KeyOpt = None, db: DbOpt = None,
             tenant: TenantOpt = "local", as_json: JsonOpt = False) -> None:
    """Check FILE as a push would (every error, with its line); store nothing."""
    text, fmt = _read(file)
    result = _attempt(str(file), lambda: _backend(url, key, db, tenant).validate(text, fmt))
    if as_json:
        _dump(result)
    else:
        for issue in result["errors"]:
            _print_issue(str(file), issue, "error")
        for issue in result["warnings"]:
            _print_issue(str(file), issue, "warning")
        if result["valid"]:
            console.print(f"{file}: valid: {result['name']} "
                          f"(agents: {', '.join(result['agents'])})")
        else:
            err_console.print(f"{file}: {len(result['errors'])} error(s)")
    raise typer.Exit(0 if result["valid"] else 1)


@workflows_app.command("list")
def list_(url: UrlOpt = None, key: KeyOpt = None, db: DbOpt = None,
          tenant: TenantOpt = "local", as_json: JsonOpt = False) -> None:
    """Registered workflows (latest versions), then the served, read-only ones."""
    items = _attempt("", lambda: _backend(url, key, db, tenant).list())["items"]
    if as_json:
        _dump(items)
        return
    table = Table("name", "kind", "version", "author", "ref", box=None)
    for w in items:
        table.add_row(w["name"], w["kind"], str(w["version"] or "-"), w["author"] or "-",
                      w["ref"])
    console.print(table)


@workflows_app.command("show")
def show(name: Annotated[str, typer.Argument(help="NAME (its versions) or NAME@VERSION (its "
                                                  "text).")],
         url: UrlOpt = None, key: KeyOpt = None, db: DbOpt = None,
         tenant: TenantOpt = "local", as_json: JsonOpt = False) -> None:
    """A workflow's versions, or one version's text as it was pushed."""
    base, version = _name(name)
    found = _attempt(name, lambda: _backend(url, key, db, tenant).show(base, version))
    if as_json:
        _dump(found)
    elif version is not None:
        sys.stdout.write(found["source"])
    else:
        console.print(f"{found['name']}: latest version {found['version']} "
                      f"(agents: {', '.join(found['agents'])})")
        table = Table("version", "author", "content hash", "ref", box=None)
        for v in found["versions"]:
            table.add_row(str(v["version"]), v["author"], v["content_hash"][:12], v["ref"])
        console.print(table)


@workflows_app.command("graph")
def graph(name: Annotated[str, typer.Argument(help="NAME, NAME@VERSION, or builtin:NAME.")],
          url: UrlOpt = None, key: KeyOpt = None, db: DbOpt = None,
          tenant: TenantOpt = "local", as_json: JsonOpt = False) -> None:
    """The workflow as nodes and edges (agents, tools, MCP servers; delegation, use, gates)."""
    base, version = _name(name)
    drawn = _attempt(name, lambda: _backend(url, key, db, tenant).graph(base, version))
    if as_json:
        _dump(drawn)
        return
    nodes = {n["id"]: n for n in drawn["nodes"]}
    edges = drawn["edges"]
    console.print(f"[bold]{drawn['workflow']}[/bold] (roots: "
                  f"{', '.join(r.removeprefix('agent:') for r in drawn['roots'])})")
    for node in drawn["nodes"]:
        if node["kind"] != "agent":
            continue
        data = node["data"]
        console.print(f"agent [bold]{node['label']}[/bold]  model {data['model']}  max_steps "
                      f"{data['limits']['max_steps']}", highlight=False)
        for edge in (e for e in edges if e["source"] == node["id"]):
            target = nodes.get(edge["target"], {"label": edge["target"], "data": {}})
            if edge["kind"] == "delegates_to":
                console.print(f"  → delegates to {target['label']}", highlight=False)
            elif edge["kind"] == "uses":
                caps = ", ".join(target["data"].get("capabilities", [])) or "no capabilities"
                permitted = edge["data"].get("permitted", True)
                denied = "" if permitted else " [red](not permitted)[/red]"
                console.print(f"  → uses {target['label']} ({caps}){denied}", highlight=False)
            elif edge["kind"] == "gated":
                console.print(f"  ⏸ gated: {target['label']}: {edge['data'].get('reason')}",
                              highlight=False)
    for node in drawn["nodes"]:
        if node["kind"] == "mcp":
            tools = [nodes[e["target"]]["label"] for e in edges
                     if e["kind"] == "provides" and e["source"] == node["id"]]
            console.print(f"mcp server [bold]{node['label']}[/bold] "
                          f"({node['data'].get('transport')}): {', '.join(tools)}",
                          highlight=False)

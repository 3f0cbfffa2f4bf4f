"""The ``alpaca`` command line (Typer + Rich). Exit codes: 0 ok, 1 failed, 3 waiting."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from . import doctor as doctor_mod
from .collector import tune_collector
from .config import Settings
from .coord.factory import Coordination, make_coordination
from .engine import Engine, RunBusy
from .errors import ApprovalConflict, NotFound, UnstorableText
from .faults import Unavailable, coordination_fault, mask_url
from .lifecycle import RunState
from .render import (
    ProgressPrinter,
    approvals_table,
    budget_line,
    print_table,
    run_summary,
    run_tree,
    runs_table,
    short,
    steps_table,
    table_width,
    timeline_view,
)
from .store.base import Store
from .store.factory import make_store
from .store.records import ApprovalRecord, ApprovalStatus, RunRecord
from .telemetry.audit import AuditRecord, verify_chain
from .telemetry.logging import configure_logging
from .telemetry.tracing import configure_tracing
from .verification import RunVerification, verify_runs
from .worker import Worker
from .workflows.loader import WorkflowError, load_workflow, resolve_workflow

T = TypeVar("T")


def _flags_take_no_value() -> None:
    """Typer's Rich help prints a type beside every option, ``--json <bool>`` included, though
    a flag takes no value (its plain help skips flags; the Rich panel calls
    ``display_type_rich`` unconditionally). Flags and counters show no type here."""
    original = typer.core.TyperOption.display_type_rich

    def display_type_rich(self: typer.core.TyperOption, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        return original(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()

app = typer.Typer(help="Alpaca Agent Engine: run governed, durable, auditable AI agents.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
runs_app = typer.Typer(help="Inspect, resume and cancel runs.", no_args_is_help=True)
tools_app = typer.Typer(help="Tools of a workflow.", no_args_is_help=True)
agents_app = typer.Typer(help="Agents of a workflow.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
approvals_app = typer.Typer(help="Supervisor decisions on gated actions.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit log of a run.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for `alpaca serve`.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(tools_app, name="tools")
app.add_typer(agents_app, name="agents")
app.add_typer(db_app, name="db")
app.add_typer(approvals_app, name="approvals")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")

console = Console()
err_console = Console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_WAITING = 0, 1, 3
JsonOpt = Annotated[bool, typer.Option("--json", help="Print data as JSON.")]
DbOpt = Annotated[str | None, typer.Option("--db", envvar="ALPACA_DATABASE_URL",
                                           help="Database URL (default sqlite:///./alpaca.db).")]
WorkflowOpt = Annotated[str, typer.Option("--workflow", "-w",
                                          help="Workflow file (default: the bundled demo).")]


def settings(db: str | None) -> Settings:
    try:
        s = Settings()
    except ValidationError as exc:  # e.g. ALPACA_CONNECT_TIMEOUT=soon: one line, exit 1
        first = exc.errors()[0]
        head, *rest = [str(p) for p in first["loc"]] or ["?"]
        name = f"ALPACA_{head.upper()}" + (f" ({'.'.join(rest)})" if rest else "")
        error_line(f"configuration {name}: {first['msg']} (got {first.get('input')!r})")
        raise typer.Exit(EXIT_FAILED) from None
    if db:
        s.database_url = db
    return s


@asynccontextmanager
async def open_store(cfg: Settings) -> AsyncIterator[Store]:
    store = make_store(cfg.database_url, cfg.audit_key_bytes(),
                       connect_timeout=cfg.connect_timeout)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def coordination(cfg: Settings) -> Coordination:
    """The configured coordination (Redis or in-process), not yet checked."""
    return make_coordination(cfg.redis_url, connect_timeout=cfg.connect_timeout)


def error_line(message: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width (and no markup parsing)."""
    err_console.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except Unavailable as exc:  # an unusable database or Redis: one line naming the fix
        error_line(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    except (NotFound, UnstorableText) as exc:
        error_line(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    except WorkflowError as exc:
        err_console.print(f"[red]workflow error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None


def dump(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def run_json(run: RunRecord) -> dict[str, Any]:
    """A run as ``--json`` prints it: a typed run's output is its JSON value, not a string."""
    return {**run.model_dump(mode="json"), "output": run.value}


def exit_code(run: RunRecord) -> int:
    if run.state == RunState.SUCCEEDED:
        return EXIT_OK
    if run.state == RunState.WAITING:
        return EXIT_WAITING
    return EXIT_FAILED


def workflow_ref(path: str) -> str:
    return path if path.startswith("builtin:") else str(Path(path).resolve())


async def _run_and_report(cfg: Settings, ref: str, agent: str, text: str, as_json: bool,
                          budget: dict[str, Any]) -> int:
    workflow = resolve_workflow(ref)
    async with open_store(cfg) as store:
        emit = (lambda e: None) if as_json else ProgressPrinter(console)
        engine = Engine(store, resolve_workflow, lease_seconds=cfg.lease_seconds, emit=emit,
                        tenant_policies=cfg.tenant_policies())
        run = await engine.submit(workflow, agent, text, budget=budget)
        if not as_json:
            console.print(f"[dim]run {run.id} · agent {agent} · {mask_url(cfg.database_url)}"
                          "[/dim]")
        final = await engine.run_tree(run.id)
        if as_json:
            dump(run_json(final))
        else:
            console.print(run_summary(final))
            await print_pending(store, final)
        return exit_code(final)


async def print_pending(store: Store, run: RunRecord) -> None:
    """Tell the user what a waiting tree waits for and how to decide it."""
    if run.state != RunState.WAITING:
        return
    for approval in await store.list_approvals(status=ApprovalStatus.PENDING, limit=1000):
        if approval.root_id != run.root_id:
            continue
        console.print(f"[magenta]waiting for approval[/magenta] {approval.id}: "
                      f"{approval.action}({short(approval.arguments, 60)}) — {approval.reason}")
        console.print(f"  decide with: alpaca approvals approve {approval.id} "
                      f"(or reject), then: alpaca runs resume {run.id}")


DEMO_QUESTION = "Should we launch Alpaca Engine in the EU this quarter?"


@app.command()
def demo(
    db: DbOpt = None,
    as_json: JsonOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y",
                                      help="Approve gated actions without asking.")] = False,
) -> None:
    """Run the bundled example offline: an orchestrator delegating to search, research,
    decision and notification agents over real tools; the Slack post waits for approval."""
    cfg = settings(db)
    code = run_async(lambda: _demo(cfg, as_json, yes))
    raise typer.Exit(code)


async def _demo(cfg: Settings, as_json: bool, yes: bool) -> int:
    from .examples_builtin.demo_env import demo_world

    interactive = sys.stdin.isatty() and not yes and not as_json
    with demo_world() as world:
        async with open_store(cfg) as store:
            printer = ProgressPrinter(console, root_agent="orchestrator")
            engine = Engine(store, resolve_workflow, lease_seconds=cfg.lease_seconds,
                            emit=(lambda e: None) if as_json else printer)
            workflow = resolve_workflow("builtin:demo")
            run = await engine.submit(workflow, "orchestrator", DEMO_QUESTION)
            if not as_json:
                console.print(f"[bold]{DEMO_QUESTION}[/bold]\n[dim]run {run.id} · "
                              f"{mask_url(cfg.database_url)} · intranet and Slack on "
                              f"{world.base_url}"
                              f"[/dim]")
            final = await engine.run_tree(run.id)
            while final.state == RunState.WAITING:
                pending = [a for a in await store.list_approvals(
                    status=ApprovalStatus.PENDING, limit=1000) if a.root_id == run.id]
                if not pending:
                    break
                for approval in pending:
                    approve = _demo_decide(approval, interactive, as_json)
                    await store.decide_approval(
                        approval.id, approve=approve,
                        by="you" if interactive else "demo-supervisor",
                        comment=None if interactive else "approved by the demo (no terminal)",
                        now=time.time())
                final = await engine.run_tree(run.id)
            tree = await store.list_runs(root_id=run.id, limit=1000)
            ledger = await store.get_ledger(run.id)
            verified = [(r.id, verify_chain(await store.list_audit(r.id),
                                            key=cfg.audit_key_bytes(), run_id=r.id))
                        for r in tree]
        if as_json:
            dump({**run_json(final), "budget_used": ledger.used,
                  "budget_limits": ledger.limits, "slack_posts": world.posts,
                  "audit_ok": all(v.ok for _, v in verified)})
            return exit_code(final)
        console.print()
        console.print(run_tree(final, tree))
        console.print(budget_line(ledger.used, ledger.limits, runs=len(tree)))
        for post in world.posts:
            console.print(f"[green]Slack[/green] {post.get('channel', '')}: {post.get('text')}")
        bad = [rid for rid, v in verified if not v.ok]
        console.print(f"audit: {len(verified) - len(bad)}/{len(verified)} chains verified"
                      + (f" [red]tampered: {', '.join(bad)}[/red]" if bad else ""))
        console.print(run_summary(final))
        return exit_code(final)


def _demo_decide(approval: ApprovalRecord, interactive: bool, quiet: bool) -> bool:
    what = f"{approval.action}({short(approval.arguments, 80)})"
    if interactive:
        from rich.prompt import Confirm

        return Confirm.ask(f"[magenta]Approve[/magenta] {what}?", default=True)
    if not quiet:
        console.print(f"[magenta]no terminal to ask: approving {what} as the demo's own "
                      f"supervisor[/magenta]")
    return True


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="Workflow YAML file.", exists=True,
                                         dir_okay=False)],
    agent: Annotated[str, typer.Option("--agent", "-a", help="Agent to run.")],
    input: Annotated[str, typer.Option("--input", "-i", help="The user's input.")],
    max_steps: Annotated[int | None, typer.Option(help="Budget: steps for the tree.")] = None,
    max_tool_calls: Annotated[int | None, typer.Option(help="Budget: tool calls.")] = None,
    submit_only: Annotated[bool, typer.Option(
        "--submit-only", help="Queue the run for `alpaca worker`/`alpaca serve`; print its id.")
    ] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run AGENT of FILE on INPUT with live progress. Exit 0 succeeded, 3 waiting, 1 failed."""
    cfg = settings(db)
    budget = {k: v for k, v in (("max_steps", max_steps), ("max_tool_calls", max_tool_calls))
              if v is not None}
    try:
        load_workflow(file).agent(agent)
    except WorkflowError as exc:
        err_console.print(f"[red]workflow error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    except KeyError as exc:
        err_console.print(f"[red]error:[/red] {exc.args[0]}")
        raise typer.Exit(EXIT_FAILED) from None
    if submit_only:
        queued = run_async(lambda: _submit(cfg, workflow_ref(str(file)), agent, input, budget))
        if as_json:
            dump(run_json(queued))
        else:
            console.print(queued.id)
        raise typer.Exit(EXIT_OK)
    code = run_async(lambda: _run_and_report(cfg, workflow_ref(str(file)), agent, input,
                                             as_json, budget))
    raise typer.Exit(code)


async def _submit(cfg: Settings, ref: str, agent: str, text: str,
                  budget: dict[str, Any]) -> RunRecord:
    coord = coordination(cfg)
    try:
        await coord.check()
        async with open_store(cfg) as store:
            engine = Engine(store, resolve_workflow, dispatcher=coord.dispatcher)
            return await engine.submit(resolve_workflow(ref), agent, text, budget=budget)
    finally:
        await coord.close()


@runs_app.command("list")
def runs_list(
    state: Annotated[RunState | None, typer.Option(help="Only runs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs.")] = 50,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    async def go() -> list[RunRecord]:
        async with open_store(settings(db)) as store:
            return await store.list_runs(state=state, limit=limit)

    runs = run_async(go)
    if as_json:
        dump([run_json(r) for r in runs])
    else:
        print_table(console, runs_table(runs, table_width(console)))


@runs_app.command("show")
def runs_show(
    run_id: str,
    timeline: Annotated[bool, typer.Option(
        help="Steps with durations, attempts, breaker events and decisions.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run: its tree of sub-runs, its steps and its result."""
    async def go() -> tuple[RunRecord, list[Any], list[RunRecord], list[AuditRecord]]:
        async with open_store(settings(db)) as store:
            run = await store.get_run(run_id)
            tree = await store.list_runs(root_id=run.root_id, limit=10_000)
            audit = await store.list_audit(run_id) if timeline else []
            return run, await store.list_steps(run_id), tree, audit

    run, steps, tree, audit = run_async(go)
    if timeline and not as_json:
        console.print(timeline_view(run, steps, audit))
        console.print(run_summary(run))
        return
    if as_json:
        dump({"run": run_json(run),
              "steps": [s.model_dump(mode="json") for s in steps],
              "tree": [run_json(r) for r in tree]})
        return
    root = next((r for r in tree if r.id == run.root_id), run)
    console.print(run_tree(root, tree))
    console.print(steps_table(steps))
    console.print(run_summary(run))


@runs_app.command("resume")
def runs_resume(
    run_id: str,
    force: Annotated[bool, typer.Option(help="Take the lease even if its owner may live.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume a run from its journal (completed steps are not executed again)."""
    cfg = settings(db)

    async def go() -> RunRecord:
        async with open_store(cfg) as store:
            emit = (lambda e: None) if as_json else ProgressPrinter(console)
            engine = Engine(store, resolve_workflow, lease_seconds=cfg.lease_seconds, emit=emit,
                            max_run_attempts=cfg.max_run_attempts)
            run = await engine.resume(run_id, force=force)
            await engine.run_tree(run.root_id)
            return await store.get_run(run_id)

    try:
        final = run_async(go)
    except RunBusy as exc:
        err_console.print(f"[red]error:[/red] {exc}", soft_wrap=True)  # one line, any width
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        dump(run_json(final))
    else:
        console.print(run_summary(final))
    raise typer.Exit(exit_code(final))


@runs_app.command("cancel")
def runs_cancel(run_id: str, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a run and its whole subtree (running ones stop at their next step)."""
    async def go() -> list[RunRecord]:
        async with open_store(settings(db)) as store:
            return await Engine(store, resolve_workflow).cancel(run_id)

    runs = run_async(go)
    if as_json:
        dump([run_json(r) for r in runs])
        return
    for run in runs:
        what = "cancel requested" if run.state == RunState.RUNNING else str(run.state)
        console.print(f"{run.id}: {what}")


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Runs executed at once.")] = None,
    until_idle: Annotated[bool, typer.Option(help="Exit when no work is left.")] = False,
    db: DbOpt = None,
) -> None:
    """Execute queued runs; resume runs whose worker died. SIGTERM drains and releases."""
    cfg = settings(db)

    async def go() -> int:
        coord = coordination(cfg)
        try:
            await coord.check()
            async with open_store(cfg) as store:
                engine = Engine(store, resolve_workflow, lease_seconds=cfg.lease_seconds,
                                breakers=coord.breakers, events=coord.events,
                                dispatcher=coord.dispatcher,
                                tenant_policies=cfg.tenant_policies(),
                                max_run_attempts=cfg.max_run_attempts)
                w = Worker(engine, concurrency=concurrency or cfg.worker_concurrency,
                           poll_interval=cfg.poll_interval)
                w.install_signal_handlers()
                tune_collector()
                via = "Redis" if cfg.redis_url else "polling"
                err_console.print(f"worker {engine.owner} on {mask_url(cfg.database_url)} "
                                  f"({via})")
                await w.run(until_idle=until_idle)
                return w.completed
        finally:
            await coord.close()

    done = run_async(go)
    err_console.print(f"worker stopped after {done} run(s)")


def _workflow_for_listing(workflow: str) -> Any:
    try:
        return resolve_workflow(workflow_ref(workflow))
    except WorkflowError as exc:
        err_console.print(f"[red]workflow error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None


@tools_app.command("list")
def tools_list(workflow: WorkflowOpt = "builtin:demo", as_json: JsonOpt = False) -> None:
    """Tools with their contracts, capabilities, policies and circuit-breaker state."""
    wf = _workflow_for_listing(workflow)
    cfg = Settings()

    async def states() -> dict[str, Any]:
        coord = coordination(cfg)
        try:
            return await coord.breakers.snapshots()
        except Exception as exc:  # Redis unreachable: say so rather than guess
            fault = coordination_fault(exc, cfg.redis_url or "", cfg.connect_timeout)
            err_console.print(Text.assemble(("breaker state unavailable: ", "yellow"),
                                            str(fault or exc)), soft_wrap=True)
            return {}
        finally:
            await coord.close()

    snapshots = asyncio.run(states()) if cfg.redis_url else {}
    shared = "shared (Redis)" if cfg.redis_url else "per process (no Redis configured)"
    items = []
    for t in wf.tools:
        item = t.describe()
        snap = snapshots.get(t.name)
        item["breaker_state"] = (str(snap.state) if snap is not None else
                                 "closed" if t.breaker is not None else None)
        items.append(item)
    if as_json:
        dump(items)
        return
    from rich.table import Table

    table = Table("tool", "capabilities", "retry", "timeout", "approval", "breaker", "inputs",
                  box=None)
    for t in items:
        inputs = ", ".join(t["input_schema"].get("properties", {}))
        table.add_row(t["name"], ", ".join(t["capabilities"]), str(t["retry"]["max_attempts"]),
                      str(t["timeout"]), t["approval"], t["breaker_state"] or "-", inputs)
    console.print(table)
    console.print(f"[dim]breaker state: {shared}[/dim]")


@agents_app.command("list")
def agents_list(workflow: WorkflowOpt = "builtin:demo", as_json: JsonOpt = False) -> None:
    """Agents with their model, allowlist and limits."""
    wf = _workflow_for_listing(workflow)
    items = [a.describe() for a in wf.agents.values()]
    if as_json:
        dump(items)
        return
    from rich.table import Table

    table = Table("agent", "model", "tools", "delegates to", "max steps", box=None)
    for a in items:
        table.add_row(a["name"], a["model"], ", ".join(a["tools"]), ", ".join(a["delegates_to"]),
                      str(a["max_steps"]))
    console.print(table)


@approvals_app.command("list")
def approvals_list(
    all_: Annotated[bool, typer.Option("--all", help="Include decided and expired ones.")] = False,
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run's.")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approvals waiting for a supervisor (with --all: every approval)."""
    async def go() -> list[ApprovalRecord]:
        async with open_store(settings(db)) as store:
            return await store.list_approvals(
                status=None if all_ else ApprovalStatus.PENDING, run_id=run_id, limit=1000)

    items = run_async(go)
    if as_json:
        dump([a.model_dump(mode="json") for a in items])
    else:
        print_table(console, approvals_table(items, table_width(console)))


def _decide(approval_id: str, approve: bool, by: str, comment: str | None, db: str | None,
            as_json: bool) -> None:
    async def go() -> ApprovalRecord:
        async with open_store(settings(db)) as store:
            return await store.decide_approval(approval_id, approve=approve, by=by,
                                               comment=comment, now=time.time())

    try:
        decided = run_async(go)
    except ApprovalConflict as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        dump(decided.model_dump(mode="json"))
        return
    console.print(f"{decided.id}: {decided.status} by {decided.decided_by}; run "
                  f"{decided.run_id} is queued (an `alpaca worker` or `alpaca serve` continues "
                  f"it, or: alpaca runs resume {decided.run_id})")


ByOpt = Annotated[str, typer.Option("--by", envvar="USER", help="Who decides (recorded).")]
CommentOpt = Annotated[str | None, typer.Option("--comment", "-m", help="Why (recorded).")]


@approvals_app.command("approve")
def approvals_approve(approval_id: str, by: ByOpt = "supervisor", comment: CommentOpt = None,
                      db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a pending action: exactly its recorded arguments will run."""
    _decide(approval_id, True, by, comment, db, as_json)


@approvals_app.command("reject")
def approvals_reject(approval_id: str, by: ByOpt = "supervisor", comment: CommentOpt = None,
                     db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Reject a pending action: the agent is told (or the run fails, by policy)."""
    _decide(approval_id, False, by, comment, db, as_json)


@audit_app.command("verify")
def audit_verify(
    run_id: Annotated[str | None, typer.Argument(help="The run to verify.")] = None,
    tree: Annotated[bool, typer.Option(help="Verify every run of the run's tree.")] = False,
    all_runs: Annotated[bool, typer.Option("--all", help="Verify every run in the database "
                                           "(a compliance sweep) and print a summary.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the hash chain and check it against the run's head: exit 0 when intact,
    1 naming the first bad (edited, missing or deleted) record."""
    if (run_id is None) == (not all_runs):
        err_console.print("[red]error:[/red] give a RUN_ID or --all (not both)")
        raise typer.Exit(EXIT_FAILED)
    cfg = settings(db)

    async def go() -> list[RunVerification]:
        async with open_store(cfg) as store:
            if run_id is None:
                runs = await store.list_runs(limit=-1)
            else:
                run = await store.get_run(run_id)
                runs = (await store.list_runs(root_id=run.root_id, limit=100_000) if tree
                        else [run])
            return await verify_runs(store, runs, cfg.audit_key_bytes())

    results = run_async(go)
    bad = [v for v in results if not v.result.ok]
    if all_runs:
        _print_sweep(results, bad, as_json)
    elif as_json:
        dump([_verification_json(v) for v in results])
    else:
        for v in results:
            if v.result.ok and v.anchor is not None:
                console.print(f"[green]ok[/green] {v.run_id}: deleted with thread "
                              f"{v.anchor.thread_id}, anchored (its head, seq {v.head_seq}, "
                              f"is in record {v.anchor.seq} of the thread's chain)")
            elif v.result.ok:
                console.print(f"[green]ok[/green] {v.run_id}: {v.result.count} records, "
                              "chain intact")
            else:
                console.print(_tampered_line(v))
    raise typer.Exit(EXIT_FAILED if bad else EXIT_OK)


def _verification_json(v: RunVerification) -> dict[str, Any]:
    res = v.result
    return {"run_id": v.run_id, "ok": res.ok, "records": res.count, "head_seq": v.head_seq,
            "first_bad_seq": res.first_bad_seq, "reason": res.reason,
            "deleted_with": v.anchor.thread_id if v.anchor else None,
            "anchor_seq": v.anchor.seq if v.anchor else None}


def _tampered_line(v: RunVerification) -> str:
    return (f"[red]TAMPERED[/red] {v.run_id}: first bad record seq {v.result.first_bad_seq}: "
            f"{v.result.reason}")


def _print_sweep(results: list[RunVerification], bad: list[RunVerification],
                 as_json: bool) -> None:
    """The summary of ``audit verify --all``: counts, then every bad run."""
    if as_json:
        dump({"checked": len(results), "ok": len(results) - len(bad), "bad": len(bad),
              "failures": [_verification_json(v) for v in bad]})
        return
    for v in bad:
        console.print(_tampered_line(v))
    verdict = "[green]all chains intact[/green]" if not bad else f"[red]{len(bad)} bad[/red]"
    console.print(f"checked {len(results)} runs: {len(results) - len(bad)} ok, {verdict}")


@audit_app.command("export")
def audit_export(
    run_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="Write to a file (default stdout).")] = None,
    db: DbOpt = None,
) -> None:
    """Write a run's audit records as JSON lines (one record per line, chain order)."""
    async def go() -> list[AuditRecord]:
        async with open_store(settings(db)) as store:
            await store.get_run(run_id)
            return await store.list_audit(run_id)

    lines = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in run_async(go))
    if output is None:
        sys.stdout.write(lines)
    else:
        output.write_text(lines)
        err_console.print(f"wrote {lines.count(chr(10))} records to {output}")


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None) -> None:
    """Apply pending schema migrations (SQLite, PostgreSQL) or index sets (MongoDB)."""
    cfg = settings(db)

    async def go() -> tuple[tuple[int, ...], int]:
        async with open_store(cfg) as store:  # opening applies what is pending
            version: Any = store.schema_version()  # type: ignore[attr-defined]
            if inspect.isawaitable(version):
                version = await version
            return tuple(getattr(store, "migrations_applied", ())), int(version)

    applied, version = run_async(go)
    console.print(f"{mask_url(cfg.database_url)}: {upgrade_report(applied, version)}")


def upgrade_report(applied: tuple[int, ...], version: int) -> str:
    """What `db upgrade` did, not only where the schema ends up."""
    if not applied:
        return f"already at schema version {version}; nothing to apply"
    plural = "s" if len(applied) > 1 else ""
    return (f"applied {len(applied)} migration{plural} ({', '.join(map(str, applied))}); "
            f"schema now at version {version}")



@app.command()
def doctor(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Check the lifecycle invariant: exit 1 when any run is orphaned."""
    cfg = settings(db)

    async def go() -> doctor_mod.Report:
        async with open_store(cfg) as store:
            return await doctor_mod.check(store)

    report = run_async(go)
    if as_json:
        dump(report.as_dict())
    else:
        for line in report.lines():
            console.print(line)
    raise typer.Exit(EXIT_FAILED if report.orphans else EXIT_OK)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback only while no API "
                                            "key exists).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    no_worker: Annotated[bool, typer.Option(
        "--no-worker", help="Do not execute runs here (separate `alpaca worker`s do).")] = False,
    workflow: Annotated[list[str] | None, typer.Option(
        "--workflow", "-w", help="Workflow file to serve (repeatable; default the bundled "
                                 "demo).")] = None,
    db: DbOpt = None,
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json) with an embedded worker."""
    from .api.server import BindRefused, preflight
    from .api.server import serve as serve_api

    cfg = settings(db)
    run_async(lambda: preflight(cfg))  # an unusable store or Redis: one line, before anything
    demo_mode = not workflow
    names = [workflow_ref(w) for w in workflow or ["builtin:demo"]]
    for name in names:
        try:
            resolve_workflow(name)
        except WorkflowError as exc:
            err_console.print(f"[red]workflow error:[/red] {exc}")
            raise typer.Exit(EXIT_FAILED) from None
    try:
        if demo_mode:
            from .examples_builtin.demo_env import demo_world

            with demo_world() as world:
                err_console.print(
                    f"serving the bundled demo (its intranet and Slack stub on "
                    f"{world.base_url}); pass --workflow FILE to serve your own")
                run_async(lambda: serve_api(cfg, host=host, port=port, worker=not no_worker,
                                            workflows=names))
        else:
            run_async(lambda: serve_api(cfg, host=host, port=port, worker=not no_worker,
                                        workflows=names))
    except BindRefused as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILED) from None


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")],
    role: Annotated[str, typer.Option(
        help="user, supervisor, builder (a user who may push workflows) or admin.")] = "user",
    name: Annotated[str, typer.Option(help="A label, recorded as who decided.")] = "",
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once (only its SHA-256 is stored)."""
    from .api.auth import Role, create_api_key

    if role not in {r.value for r in Role}:
        err_console.print(f"[red]error:[/red] role must be one of "
                          f"{', '.join(r.value for r in Role)}, not {role!r}")
        raise typer.Exit(EXIT_FAILED)
    if not tenant.strip():
        err_console.print("[red]error:[/red] --tenant must not be empty")
        raise typer.Exit(EXIT_FAILED)

    async def go() -> tuple[str, Any]:
        async with open_store(settings(db)) as store:
            return await create_api_key(store, tenant, role, name)

    key, record = run_async(go)
    if as_json:
        dump({"id": record.id, "tenant": record.tenant, "role": record.role,
              "name": record.name, "key": key})
        return
    err_console.print(f"created key {record.id} for tenant {record.tenant!r} "
                      f"(role {record.role}); it is shown only this once:")
    sys.stdout.write(key + "\n")


@app.callback()
def _configure() -> None:
    """Structured JSON logs on stderr (ALPACA_LOG_LEVEL, ALPACA_LOG_FORMAT=json|text) and
    OpenTelemetry export when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    level = os.environ.get("ALPACA_LOG_LEVEL") or (
        "INFO" if {"worker", "serve"} & set(sys.argv[1:2]) else "WARNING")
    configure_logging(level=level.upper(),
                      json=os.environ.get("ALPACA_LOG_FORMAT", "json").lower() != "text")
    configure_tracing()


def main() -> None:
    app()


# Registered workflows live in their own module; the import is here, after ``app`` exists.
from . import cli_chat  # noqa: E402,F401  (registers `alpaca chat`)
from .cli_threads import threads_app  # noqa: E402
from .cli_workflows import workflows_app  # noqa: E402

app.add_typer(workflows_app, name="workflows")
app.add_typer(threads_app, name="threads")

"""``alpaca chat``: a conversation with an agent, run here on the local store (``--db``).

In a terminal it is interactive: the answer streams as the model writes it
(``engine.chat_stream``), tool steps show inline, an approval is asked inline and the turn
goes on. With stdin not a terminal it reads one message per line and prints each answer
(stdout holds only the answers; the thread id and any error go to stderr), and exits as
``alpaca run`` would for the last turn: 0 succeeded, 1 failed, 3 waiting (an approval; it
stops there, since no message can follow an unfinished turn).

Ctrl-C leaves the thread as it is: a turn it interrupted goes back to the queue with its
journal, and ``alpaca chat --thread ID`` continues that turn before taking a new message.
Exit codes besides the turns': 2 a usage error (no --agent for a new thread, an agent the
workflow lacks, --agent/--workflow that are not the thread's), 1 an unknown thread or
workflow, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm
from rich.text import Text

from .api.models_threads import ThreadMessage
from .chat_stream import ChatDelta, ChatStep, ChatStream
from .cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_WAITING,
    DbOpt,
    app,
    err_console,
    error_line,
    exit_code,
    open_store,
    run_async,
    settings,
    workflow_ref,
)
from .config import Settings
from .coord.local import LocalEventBus
from .engine import Engine, RunBusy
from .errors import NotFound, TurnInProgress
from .lifecycle import RunState
from .render import short
from .store.base import Store
from .store.records import ApprovalStatus, RunRecord, ThreadRecord
from .threads import ThreadWorkflowGone, thread_workflow
from .workflow import Workflow
from .workflows.loader import WorkflowError, resolve_workflow
from .workflows.registry import names_same_request

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
DEMO = "builtin:demo"


class Usage(Exception):
    """A usage error: one line, exit 2."""


async def _workflow(engine: Engine, tenant: str, workflow: str) -> Workflow:
    """The workflow named on the command line; one line (exit 1) when it does not load."""
    try:
        return await thread_workflow(engine, tenant, _ref(workflow))
    except WorkflowError as exc:
        raise Failed(f"workflow error: {exc}") from None


class Failed(Exception):
    """An error that is not the user's typing: one line, exit 1."""


def _ref(workflow: str) -> str:
    """A file or builtin as the ref runs record; anything else is a registered name."""
    if workflow.startswith("builtin:") or Path(workflow).exists():
        return workflow_ref(workflow)
    return workflow


@app.command()
def chat(
    agent: Annotated[str | None, typer.Option(
        "--agent", "-a", help="Agent to talk to (a new thread; optional with --thread).")] = None,
    workflow: Annotated[str | None, typer.Option(
        "--workflow", "-w", help="Workflow file or registered name (default: the bundled "
                                 "demo, whose `assistant` remembers and searches).")] = None,
    thread: Annotated[str | None, typer.Option(
        "--thread", "-t", help="Continue this thread (thr_...): its agent and workflow.")] = None,
    tenant: Annotated[str, typer.Option(help="Tenant the thread belongs to.")] = "local",
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per turn (the API's message shape), no prompt.")] = False,
) -> None:
    """Talk to AGENT: interactive in a terminal (streamed answers, tool steps and approvals
    inline); piped, one message per line, each answer printed. Exit 0 ok, 1 failed, 3 waiting
    (as `alpaca run`, for the last turn), 2 usage, 130 interrupted."""
    if thread is None and agent is None:
        error_line("give --agent NAME to start a conversation, or --thread ID to continue one")
        raise typer.Exit(EXIT_USAGE)
    cfg = settings(db)
    interactive = sys.stdin.isatty() and not as_json
    try:
        code = run_async(lambda: _chat(cfg, agent, workflow, thread, tenant, as_json,
                                       interactive))
    except Usage as exc:
        error_line(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    except (Failed, TurnInProgress, ThreadWorkflowGone, RunBusy) as exc:
        error_line(str(exc))
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:  # piped: said above, the turn handed back
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


async def _chat(cfg: Settings, agent: str | None, workflow: str | None, thread_id: str | None,
                tenant: str, as_json: bool, interactive: bool) -> int:
    async with open_store(cfg) as store:
        engine = Engine(store, resolve_workflow, lease_seconds=cfg.lease_seconds,
                        events=LocalEventBus(), tenant_policies=cfg.tenant_policies(),
                        max_run_attempts=cfg.max_run_attempts)
        if thread_id is None:
            thread = await _new_thread(engine, str(agent), workflow or DEMO, tenant)
            err_console.print(f"thread {thread.id} (resume with --thread {thread.id})",
                              highlight=False, soft_wrap=True)
        else:
            thread = await _old_thread(engine, thread_id, agent, workflow, tenant)
            turns = len(await store.list_turns(thread.id))
            err_console.print(f"thread {thread.id} · agent {thread.agent} · {turns} earlier "
                              "turn(s)", highlight=False, soft_wrap=True)
        with _world(thread.workflow):
            if interactive:
                return await Interactive(engine, thread, Console()).loop()
            try:
                return await _lines(engine, thread, as_json)
            except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels; the turn is back
                err_console.print(f"interrupted; the thread is kept: alpaca chat --thread "
                                  f"{thread.id}", highlight=False, soft_wrap=True)
                raise


async def _new_thread(engine: Engine, agent: str, workflow: str, tenant: str) -> ThreadRecord:
    wf = await _workflow(engine, tenant, workflow)
    if agent not in wf.agents:
        raise Usage(f"workflow {wf.ref} has no agent {agent!r} (its agents: "
                    f"{', '.join(wf.agents)})")
    return await engine.create_thread(agent=agent, workflow=wf, tenant=tenant)


async def _old_thread(engine: Engine, thread_id: str, agent: str | None,
                      workflow: str | None, tenant: str) -> ThreadRecord:
    store = engine.store
    try:
        thread = await store.get_thread(thread_id, tenant)
    except NotFound:
        owner = None
        with contextlib.suppress(Exception):
            owner = (await store.get_thread(thread_id)).tenant
        if owner is None:
            raise
        raise Usage(f"thread {thread_id} belongs to tenant {owner!r}, not {tenant!r} "
                    f"(pass --tenant {owner})") from None
    if agent is not None and agent != thread.agent:
        raise Usage(f"thread {thread.id} talks to agent {thread.agent!r}, not {agent!r} "
                    "(leave out --agent to continue it)")
    if workflow is not None:
        wf = await _workflow(engine, tenant, workflow)
        if not names_same_request(thread.workflow, _ref(workflow), wf.ref):
            raise Usage(f"thread {thread.id} runs workflow {thread.workflow}, not {wf.ref} "
                        "(leave out --workflow to continue it)")
    return thread


def _world(ref: str) -> AbstractContextManager[Any]:
    """The demo's local documents and Slack stub, as `alpaca demo` sets them up."""
    if ref != DEMO:
        return contextlib.nullcontext()
    from .examples_builtin.demo_env import demo_world

    return demo_world()


def _messages() -> Iterator[str]:
    # Undecodable bytes become lone surrogates, which the engine refuses in one line (a
    # strict stdin would raise mid-iteration instead, with a traceback).
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")
    for line in sys.stdin:
        if line.strip():
            yield line.rstrip("\r\n")


def _answer_text(run: RunRecord) -> str:
    value = run.value
    if run.output_type == "json":
        return json.dumps(value, ensure_ascii=False)
    return str(value or "")


async def _lines(engine: Engine, thread: ThreadRecord, as_json: bool) -> int:
    """Piped: one message per line; the exit code of the last turn."""
    code = EXIT_OK
    last = await _last_turn(engine.store, thread)
    if last is not None and not last.state.terminal:  # an interrupted turn: finish it first
        code = await _report(engine.store, await _quietly(engine, thread, None), as_json)
        if code == EXIT_WAITING:
            return code
    for text in _messages():
        code = await _report(engine.store, await _quietly(engine, thread, text), as_json)
        if code == EXIT_WAITING:
            break  # no message can follow an unfinished turn
    return code


async def _quietly(engine: Engine, thread: ThreadRecord, text: str | None) -> RunRecord:
    """``engine.chat`` as a stream nobody watches: Ctrl-C still hands the turn back."""
    stream = engine.chat_stream(thread.id, text, tenant=thread.tenant)
    async for _piece in stream:
        pass
    assert stream.run is not None
    return stream.run


async def _last_turn(store: Store, thread: ThreadRecord) -> RunRecord | None:
    turns = await store.list_turns(thread.id)
    return turns[-1] if turns else None


async def _report(store: Store, run: RunRecord, as_json: bool) -> int:
    if as_json:
        sys.stdout.write(ThreadMessage.of(run).model_dump_json() + "\n")
    elif run.state == RunState.SUCCEEDED:
        sys.stdout.write(_answer_text(run) + "\n")
    sys.stdout.flush()
    if run.state == RunState.WAITING:
        for approval in await _pending(store, run):
            error_line(f"turn {run.turn} waits for approval {approval.id}: {approval.action}("
                       f"{short(approval.arguments, 60)}); decide with: alpaca approvals "
                       f"approve {approval.id} (or reject), then: alpaca chat --thread "
                       f"{run.thread_id}")
    elif run.state != RunState.SUCCEEDED:
        error_line(f"turn {run.turn} {run.state}: {run.error_code}: {run.error_message}")
    return exit_code(run)


async def _pending(store: Store, run: RunRecord) -> list[Any]:
    return [a for a in await store.list_approvals(status=ApprovalStatus.PENDING, limit=1000)
            if a.root_id == run.root_id]


class Interactive:
    """The terminal conversation: prompt, streamed answer, inline steps and approvals."""

    def __init__(self, engine: Engine, thread: ThreadRecord, console: Console) -> None:
        self.engine = engine
        self.thread = thread
        self.console = console
        self.who = os.environ.get("USER") or "you"

    async def loop(self) -> int:
        # Ctrl-C at a prompt is a KeyboardInterrupt there (asyncio.run's own handler would
        # only cancel the task, which a blocking read never notices).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.console.print(Text(f"chat with {self.thread.agent} · {self.thread.workflow} · "
                                "/exit or Ctrl-D to leave, Ctrl-C to stop", style="dim"))
        try:
            last = await _last_turn(self.engine.store, self.thread)
            if last is not None and not last.state.terminal:
                self.console.print(Text(f"continuing turn {last.turn}: {short(last.input)}",
                                        style="dim"))
                await self.turn(None)
            while True:
                try:
                    text = self.console.input("[bold cyan]you >[/bold cyan] ")
                except EOFError:
                    self.console.print()
                    return EXIT_OK
                if text.strip() == "/exit":
                    return EXIT_OK
                if text.strip():
                    await self.turn(text)
        except (KeyboardInterrupt, asyncio.CancelledError):
            self.console.print(f"\n[dim]interrupted; the thread is kept: alpaca chat --thread "
                               f"{self.thread.id}[/dim]", highlight=False, soft_wrap=True)
            return EXIT_INTERRUPTED

    async def turn(self, text: str | None) -> None:
        """One turn (``None``: the unfinished last one), and its approvals, asked here."""
        while True:
            run = await self._streamed(self.engine.chat_stream(
                self.thread.id, text, tenant=self.thread.tenant, steps=True))
            if run.state != RunState.WAITING:
                return
            pending = await _pending(self.engine.store, run)
            if not pending:
                self.console.print("[magenta]the turn is waiting[/magenta]")
                return
            for approval in pending:
                what = escape(f"{approval.action}({short(approval.arguments, 80)})")
                approve = Confirm.ask(f"[magenta]Approve[/magenta] {what}?",
                                      console=self.console, default=True)
                await self.engine.store.decide_approval(approval.id, approve=approve,
                                                        by=self.who, comment=None,
                                                        now=time.time())
            text = None  # the decided turn goes on

    async def _streamed(self, stream: ChatStream) -> RunRecord:
        """Print the stream as it comes; Ctrl-C stops it (the turn is handed back)."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self._show(stream))
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            return await task
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    async def _show(self, stream: ChatStream) -> RunRecord:
        out = self.console
        shown = ""  # the text of the model step being written
        mid_line = named = False  # named: the agent's name is shown before its answer

        def name() -> None:
            nonlocal named, mid_line
            if not named:
                out.print(f"[bold green]{escape(self.thread.agent)} >[/bold green] ", end="")
                named = mid_line = True

        async for piece in stream:
            if isinstance(piece, ChatDelta):
                name()
                if piece.restarted and shown:
                    out.print("\n[dim](the model restarted its answer)[/dim]")
                    shown = ""
                out.print(piece.text, end="", markup=False, highlight=False, soft_wrap=True)
                shown += piece.text
                mid_line = not piece.text.endswith("\n")
            elif isinstance(piece, ChatStep):
                if mid_line:
                    out.print()
                out.print(_step_line(piece), highlight=False, soft_wrap=True)
                shown, mid_line = "", False
        run = stream.run
        assert run is not None
        if run.state == RunState.SUCCEEDED and run.output is not None and (
                shown.strip() != (run.output or "").strip()):  # not streamed, or pieces lost
            if mid_line:
                out.print()
            name()
            out.print(_answer_text(run), markup=False, highlight=False, soft_wrap=True)
        elif mid_line:
            out.print()
        if run.state not in (RunState.SUCCEEDED, RunState.WAITING):
            out.print(Text.assemble((f"✗ turn {run.state}", "red"),
                                    f" {run.error_code}: {run.error_message}"), soft_wrap=True)
        return run


def _step_line(step: ChatStep) -> Text:
    """A tool step as one dim line (plain text: results may hold anything, brackets too)."""
    if step.kind == "tool":
        outcome = (f"✗ {step.error.get('code')}: {short(step.error.get('message'), 80)}"
                   if step.error else f"→ {short(step.result, 80)}")
        return Text(f"  ↳ {step.name}({short(step.arguments, 60)}) {outcome}", style="dim")
    if step.kind == "delegation":
        return Text(f"  ↳ delegates to {step.name}", style="dim")
    return Text.assemble((f"  ⏸ {step.name}({short(step.arguments, 60)}) needs approval",
                          "magenta"), (f": {step.reason}", "dim"))

"""``alpaca threads list|show|fork|delete``: conversations kept in the local store (``--db``).

``--json`` prints the same shapes as ``/v1/threads`` (the API's response models). Sending a
message is ``Engine.chat`` / ``Engine.send_message`` (what ``alpaca chat`` uses). Exit codes:
0 ok, 1 an error (an unknown thread, a turn still in progress, a fork past the last turn).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Column, Table

from .api.models_threads import Thread, ThreadDeleted, ThreadMessage
from .cli import (
    EXIT_FAILED,
    DbOpt,
    JsonOpt,
    console,
    dump,
    error_line,
    open_store,
    run_async,
    settings,
)
from .engine import Engine
from .errors import TurnInProgress
from .forks import ForkPastEnd
from .render import STATE_STYLE, id_column, print_table, short, table_width, when, word_column
from .store.base import Store
from .workflows.loader import resolve_workflow

threads_app = typer.Typer(help="Conversations with an agent (threads): list, show, fork and "
                               "delete them.", no_args_is_help=True)

T = TypeVar("T")
ThreadArg = Annotated[str, typer.Argument(help="A thread id (thr_...).")]
TenantOpt = Annotated[str | None, typer.Option(help="Only this tenant's threads (default: "
                                                    "every tenant's).")]


def _with_store(db: str | None, body: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``body`` on the local store; a thread conflict is one line and exit 1."""
    async def go() -> T:
        async with open_store(settings(db)) as store:
            return await body(store)

    try:
        return run_async(go)
    except (TurnInProgress, ForkPastEnd) as exc:
        error_line(str(exc))
        raise typer.Exit(EXIT_FAILED) from None


def _engine(store: Store) -> Engine:
    return Engine(store, resolve_workflow)


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state, "white")
    return f"[{style}]{state}[/{style}]"


@threads_app.command("list")
def threads_list(
    tenant: TenantOpt = None,
    limit: Annotated[int, typer.Option(help="At most this many threads.")] = 50,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Threads, most recently active first (deleted ones are gone)."""
    async def go(store: Store) -> list[dict[str, Any]]:
        out = []
        for thread in await store.list_threads(tenant=tenant, limit=limit):
            turns = await store.list_turns(thread.id)
            out.append({**Thread.of(thread).model_dump(mode="json"), "turns": len(turns),
                        "last_state": str(turns[-1].state) if turns else None})
        return out

    items = _with_store(db, go)
    if as_json:
        dump(items)
        return
    table = Table(id_column("id", (t["id"] for t in items)),
                  word_column("agent", (t["agent"] for t in items)), Column("turns"),
                  Column("last turn"), Column("updated", min_width=10), Column("title"),
                  box=None)
    for t in items:
        table.add_row(t["id"], t["agent"], str(t["turns"]),
                      _styled(t["last_state"]) if t["last_state"] else "-",
                      when(t["updated_at"]), short(t["title"], 40))
    print_table(console, table)


@threads_app.command("show")
def threads_show(thread_id: ThreadArg, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """A thread and its turns: each message, its answer, and the run that made it."""
    async def go(store: Store) -> tuple[Thread, list[ThreadMessage]]:
        thread = await store.get_thread(thread_id)
        return Thread.of(thread), [ThreadMessage.of(r) for r in
                                   await store.list_turns(thread.id)]

    thread, messages = _with_store(db, go)
    if as_json:
        dump({"thread": thread.model_dump(mode="json"),
              "messages": [m.model_dump(mode="json") for m in messages]})
        return
    fork = (f" · fork of {thread.forked_from} at turn {thread.forked_turn}"
            if thread.forked_from else "")
    console.print(f"[bold]{thread.id}[/bold] {thread.title!r} · agent {thread.agent} · "
                  f"{thread.workflow}{fork}", highlight=False, soft_wrap=True)
    width = table_width(console)
    for m in messages:
        console.print(f"[bold]{m.turn}[/bold] {_styled(str(m.state))} {m.run_id}",
                      highlight=False)
        console.print(f"  [cyan]user[/cyan]  {short(m.content, (width or 100) - 10)}",
                      highlight=False, soft_wrap=True)
        answer = m.answer if m.answer is not None else (
            f"({m.error_code}: {m.error_message})" if m.error_code else "…")
        console.print(f"  [green]agent[/green] {short(answer, (width or 100) - 10)}",
                      highlight=False, soft_wrap=True)


@threads_app.command("fork")
def threads_fork(
    thread_id: ThreadArg,
    turn: Annotated[int, typer.Option(help="How many turns the new thread shares (0 to the "
                                           "last).")],
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A new thread sharing the first TURN turns.

    The turns are copied: replayed as history, their tools never run again."""
    async def go(store: Store) -> Thread:
        source = await store.get_thread(thread_id)
        fork = await _engine(store).fork_thread(thread_id, turn, tenant=source.tenant)
        return Thread.of(fork)

    fork = _with_store(db, go)
    if as_json:
        dump(fork.model_dump(mode="json"))
    else:
        console.print(f"forked {thread_id} at turn {turn}: {fork.id}", highlight=False)


@threads_app.command("delete")
def threads_delete(thread_id: ThreadArg, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Erase a thread's content; its audit chain keeps the anchors.

    Messages, answers, steps and audit records of every turn go; the thread's own chain keeps
    each erased run's chain head, so `alpaca audit verify RUN_ID` says "deleted, anchored"."""
    async def go(store: Store) -> ThreadDeleted:
        source = await store.get_thread(thread_id)
        gone = await _engine(store).delete_thread(thread_id, tenant=source.tenant,
                                                  actor="cli")
        return ThreadDeleted.of(gone, (await store.list_thread_audit(thread_id))[-1])

    gone = _with_store(db, go)
    if as_json:
        dump(gone.model_dump(mode="json"))
    else:
        console.print(f"deleted {gone.id}: {gone.erased_runs} run(s) erased; their chain "
                      f"heads are anchored in record {gone.anchor_seq} of the thread's audit "
                      "chain", highlight=False)

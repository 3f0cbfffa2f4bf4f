"""Terminal rendering of live progress and of runs, with Rich."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.table import Column, Table
from rich.tree import Tree

from .delegation import children_of
from .events import Event
from .store.records import ApprovalRecord, RunRecord, StepRecord
from .telemetry.audit import AuditRecord

STATE_STYLE = {
    "queued": "cyan", "running": "yellow", "waiting": "magenta", "succeeded": "green",
    "failed": "red", "cancelled": "bright_black", "timed_out": "red",
}


# Run, approval and key ids: users copy them into the next command, so they are never cut.
_ID = re.compile(r"\b(?:run|apr|key|thr)_[0-9a-f]{8,}(?:\.\d+)*")


def short(value: Any, limit: int = 80) -> str:
    """One line of at most ``limit`` characters, except that an id is never cut in half."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = limit - 1
    for match in _ID.finditer(text):
        if match.start() < cut < match.end():
            cut = match.end()
            break
    return text if cut >= len(text) else text[:cut] + "…"


def id_column(header: str, ids: Iterable[str]) -> Column:
    """A table column as wide as its longest id: other columns wrap first, at any width and
    when piped; only a terminal narrower than one id folds it (never an ellipsis)."""
    return Column(header, no_wrap=True, overflow="fold",
                  min_width=max((len(i) for i in ids), default=len(header)))


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


class ProgressPrinter:
    """An EventSink that prints one line per finished step as it happens, indented by the
    depth of the run in its delegation tree and labelled with its agent."""

    def __init__(self, console: Console, root_agent: str | None = None) -> None:
        self.console = console
        self.agents: dict[str, str] = {}
        self.root_agent = root_agent

    def __call__(self, event: Event) -> None:
        kind = event["type"]
        run_id = str(event.get("run_id", ""))
        pad = "  " * run_id.count(".")
        who = self.agents.get(run_id, self.root_agent)
        label = f"[blue]{who}[/blue] " if who else ""
        if kind == "delegation.started":
            self.agents[str(event["child_id"])] = str(event["agent"])
            self.console.print(f"{pad}    {label}[cyan]delegates to[/cyan] "
                               f"[bold]{event['agent']}[/bold] [dim]{event['child_id']}[/dim]")
            return
        if kind == "approval.requested":
            self.console.print(f"{pad}    {label}[magenta]⏸ needs approval[/magenta] "
                               f"{event['action']}({short(event['arguments'], 60)}): "
                               f"{event['reason']}")
            return
        if kind == "output.invalid":
            self.console.print(f"{pad}    {label}[red]✗ answer rejected[/red]: "
                               f"{short(event['message'], 200)}")
            return
        if kind != "step.completed":
            return
        seq = f"{pad}{label}[bold]{event['seq']:>2}[/bold]"
        ms = f"[dim]{event['ms']:.1f} ms[/dim]"
        if event["kind"] == "model":
            if event["tool_calls"]:
                what = "calls " + ", ".join(f"[cyan]{n}[/cyan]" for n in event["tool_calls"])
            else:
                what = "answers"
            self.console.print(f"{seq} model [magenta]{event['name']}[/magenta] {what}  {ms}")
        else:
            if event.get("error"):
                err = event["error"]
                outcome = f"[red]✗ {err['code']}[/red]: {short(err['message'], 300)}"
            else:
                outcome = f"[green]→[/green] {short(event['result'])}"
            self.console.print(
                f"{seq} tool  [cyan]{event['name']}[/cyan]({short(event['arguments'], 50)}) "
                f"{outcome}  {ms}")


def run_summary(run: RunRecord) -> Panel:
    style = STATE_STYLE.get(str(run.state), "white")
    body: RenderableType
    if run.state == "succeeded" and run.output_type == "json" and run.output is not None:
        body = JSON(run.output, indent=2)  # a typed agent's value, pretty
    elif run.state == "succeeded":
        body = run.output or ""
    elif run.error_code:
        body = f"[red]{run.error_code}[/red]: {run.error_message}"
    else:
        body = f"run is {run.state}"
    usage = run.usage
    # This run's own usage, not its sub-runs' (budget_line has the tree); its "calls" count
    # delegations too, where the tree's tool_calls budget does not.
    subtitle = (f"this run only: {usage.get('steps', 0)} steps · "
                f"{usage.get('tool_calls', 0)} tool/delegation calls · "
                f"{usage.get('input_tokens', 0)}+{usage.get('output_tokens', 0)} tokens"
                if usage else None)
    return Panel(body, title=f"[{style}]{run.state}[/{style}] {run.id}", subtitle=subtitle,
                 title_align="left")


def steps_table(steps: list[StepRecord]) -> Table:
    table = Table("#", "kind", "name", "status", "attempts", "ms", "result", box=None)
    for s in steps:
        ms = f"{(s.finished_at - s.started_at) * 1000:.1f}" if s.finished_at else "-"
        if s.error:
            result = f"[red]{s.error.get('code')}[/red]: {short(s.error.get('message', ''), 60)}"
        elif s.kind == "model" and isinstance(s.output, dict):
            calls = [c["name"] for c in s.output.get("tool_calls", [])]
            result = ("calls " + ", ".join(calls)) if calls else short(s.output.get("content"))
        else:
            result = short(s.output)
        table.add_row(str(s.seq), str(s.kind), s.name, str(s.status), str(s.attempts), ms,
                      result)
    return table


def run_tree(root: RunRecord, runs: list[RunRecord]) -> Tree:
    """``root`` and its descendants among ``runs`` (the runs of its tree)."""
    children = children_of(runs)

    def label(r: RunRecord) -> str:
        style = STATE_STYLE.get(str(r.state), "white")
        return f"{r.agent} [dim]{r.id}[/dim] [{style}]{r.state}[/{style}]"

    tree = Tree(label(root))

    def add(node: Tree, run: RunRecord) -> None:
        for child in children.get(run.id, []):
            add(node.add(label(child)), child)

    add(tree, root)
    return tree


def table_width(console: Console) -> int | None:
    """The width a table must fit: the terminal's, or None when piped (drawn whole)."""
    return console.width if console.is_terminal else None


def print_table(console: Console, table: Table) -> None:
    """Piped output keeps every row on one line (for grep and cut) instead of wrapping at
    the 80 columns Rich assumes without a terminal."""
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update(max_width=100_000))
    # Console.print never draws wider than its console: a second one on the same file does.
    Console(file=console.file, width=max(console.width, natural.maximum)).print(table)


_CELL_PADDING = 2  # a box-less table pads every cell by one space on each side
_NARROWEST = 8  # below this a wrapped text column is unreadable
_WIDEST_WORD = 24  # a name longer than this may fold; shorter ones are never cut


def word_column(header: str, values: Iterable[str]) -> Column:
    """A column of names and codes (agent, state, error code): kept whole up to
    ``_WIDEST_WORD`` characters, folded (never cut with an ellipsis) beyond."""
    longest = max((len(v) for v in values), default=0)
    return Column(header, overflow="fold", min_width=min(max(longest, len(header)),
                                                         _WIDEST_WORD))


def fit_columns(columns: list[Column], drop_first: list[str], width: int | None) -> list[Column]:
    """The columns that fit ``width``, dropping those named in ``drop_first`` in that order.

    Column priorities: id and name columns never shrink below their words, so at 80 columns
    something else has to give; ``None`` (output piped, drawn whole) keeps every column.
    """
    kept = list(columns)
    for name in drop_first:
        need = sum(max(c.min_width or 0, _NARROWEST) + _CELL_PADDING for c in kept)
        if width is None or need <= width:
            break
        kept = [c for c in kept if c.header != name]
    return kept


def _fitted(columns: list[Column], rows: list[dict[str, str]], drop_first: list[str],
            width: int | None) -> Table:
    kept = fit_columns(columns, drop_first, width)
    hidden = [str(c.header) for c in columns if c not in kept]
    table = Table(*kept, box=None, caption_justify="left", caption=(
        f"hidden at this width: {', '.join(hidden)} (--json shows every field)"
        if hidden else None))
    for row in rows:
        table.add_row(*(row[str(c.header)] for c in kept))
    return table


def runs_table(runs: list[RunRecord], width: int | None = None) -> Table:
    """Runs; at ``width`` columns depth, then created, give way to whole ids and names."""
    rows = [{"id": r.id, "agent": r.agent, "state": str(r.state), "depth": str(r.depth),
             "created": when(r.created_at), "error": r.error_code or ""} for r in runs]
    columns = [id_column("id", (r["id"] for r in rows)),
               word_column("agent", (r["agent"] for r in rows)),
               word_column("state", (r["state"] for r in rows)), Column("depth"),
               Column("created", min_width=10),
               word_column("error", (r["error"] for r in rows))]
    for row in rows:
        style = STATE_STYLE.get(row["state"], "white")
        row["state"] = f"[{style}]{row['state']}[/{style}]"
    return _fitted(columns, rows, ["depth", "created"], width)


def approvals_table(items: list[ApprovalRecord], width: int | None = None) -> Table:
    """Approvals; at ``width`` columns the least needed ones go first (decided by, status,
    reason), so a supervisor still sees ids, action and arguments."""
    rows = [{"id": a.id, "run": a.run_id, "action": a.action,
             "arguments": short(a.arguments, 50), "reason": short(a.reason, 40),
             "status": str(a.status), "decided by": a.decided_by or ""} for a in items]
    columns = [id_column("id", (r["id"] for r in rows)),
               id_column("run", (r["run"] for r in rows)),
               word_column("action", (r["action"] for r in rows)), Column("arguments"),
               Column("reason"), word_column("status", (r["status"] for r in rows)),
               Column("decided by")]
    return _fitted(columns, rows, ["decided by", "status", "reason"], width)


_DECISION_STYLE = {
    "gate.": "red", "breaker.": "yellow", "approval.": "magenta", "tool.retry": "yellow",
    "delegation.": "cyan", "budget.": "dim", "state.changed": "blue",
}


def _style(kind: str) -> str:
    for prefix, style in _DECISION_STYLE.items():
        if kind.startswith(prefix):
            return style
    return "white"


def _decision_text(record: AuditRecord) -> str:
    data = {k: v for k, v in record.data.items() if k not in ("step", "tool")}
    style = _style(record.kind)
    return f"[{style}]{record.kind}[/{style}] {short(data, 90)}"


def timeline_view(run: RunRecord, steps: list[StepRecord], audit: list[AuditRecord]) -> Tree:
    """Each step with its duration and attempts, and under it every decision made for it."""
    by_step: dict[int, list[AuditRecord]] = {}
    run_level: list[AuditRecord] = []
    for record in audit:
        step = record.data.get("step")
        if isinstance(step, int):
            by_step.setdefault(step, []).append(record)
        elif record.kind not in ("model.output",):
            run_level.append(record)
    start = run.created_at
    tree = Tree(f"[bold]{run.agent}[/bold] {run.id}  [dim]{when(run.created_at)}[/dim]")
    for record in run_level[:2]:
        tree.add(f"[dim]{record.time[11:23]}[/dim] {_decision_text(record)}")
    for s in steps:
        took = f"{(s.finished_at - s.started_at) * 1000:.1f} ms" if s.finished_at else "…"
        offset = f"+{(s.started_at - start):.3f}s"
        status = {"completed": "[green]✓[/green]", "failed": "[red]✗[/red]"}.get(
            str(s.status), "[yellow]…[/yellow]")
        attempts = f" · {s.attempts} attempts" if s.attempts > 1 else ""
        node = tree.add(f"{status} [bold]{s.seq:>3}[/bold] {s.kind} [cyan]{s.name}[/cyan] "
                        f"[dim]{offset}[/dim] {took}{attempts}")
        if s.error:
            node.add(f"[red]{s.error.get('code')}[/red]: {short(s.error.get('message'), 90)}")
        for record in by_step.get(s.seq, []):
            if record.kind == "model.output":
                calls = [c["name"] for c in record.data.get("tool_calls", [])]
                text = ("calls " + ", ".join(calls)) if calls else short(
                    record.data.get("content"), 80)
                node.add(f"[dim]model →[/dim] {text}")
            elif record.kind != "tool.result":
                node.add(_decision_text(record))
    for record in run_level[2:]:
        tree.add(f"[dim]{record.time[11:23]}[/dim] {_decision_text(record)}")
    return tree


def budget_line(used: dict[str, float], limits: dict[str, float], runs: int | None = None) -> str:
    """The tree's shared ledger: every run of it counts (delegations count as steps only)."""
    parts = []
    for resource in ("steps", "tool_calls", "tokens", "cost"):
        value = used.get(resource, 0.0)
        limit = limits.get(resource)
        shown = f"{value:.6f}".rstrip("0").rstrip(".") if resource == "cost" else f"{value:g}"
        parts.append(f"{resource} {shown}" + (f"/{limit:g}" if limit is not None else ""))
    tree = f"the whole tree ({runs} runs)" if runs is not None else "the whole tree"
    return f"budget used by {tree}: " + " · ".join(parts)

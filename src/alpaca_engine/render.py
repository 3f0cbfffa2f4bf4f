"""Terminal rendering of live progress and of runs, with Rich."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.tree import Tree

from .delegation import children_of
from .events import Event
from .store.records import ApprovalRecord, RunRecord, StepRecord
from .telemetry.audit import AuditRecord

STATE_STYLE = {
    "queued": "cyan", "running": "yellow", "waiting": "magenta", "succeeded": "green",
    "failed": "red", "cancelled": "bright_black", "timed_out": "red",
}


def short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
                outcome = f"[red]✗ {err['code']}[/red]: {short(err['message'], 70)}"
            else:
                outcome = f"[green]→[/green] {short(event['result'])}"
            self.console.print(
                f"{seq} tool  [cyan]{event['name']}[/cyan]({short(event['arguments'], 50)}) "
                f"{outcome}  {ms}")


def run_summary(run: RunRecord) -> Panel:
    style = STATE_STYLE.get(str(run.state), "white")
    if run.state == "succeeded":
        body = run.output or ""
    elif run.error_code:
        body = f"[red]{run.error_code}[/red]: {run.error_message}"
    else:
        body = f"run is {run.state}"
    usage = run.usage
    subtitle = (f"{usage.get('steps', 0)} steps · {usage.get('tool_calls', 0)} tool calls · "
                f"{usage.get('input_tokens', 0)}+{usage.get('output_tokens', 0)} tokens"
                if usage else None)
    return Panel(body, title=f"[{style}]{run.state}[/{style}] {run.id}", subtitle=subtitle,
                 title_align="left")


def runs_table(runs: list[RunRecord]) -> Table:
    table = Table("id", "agent", "state", "depth", "created", "error", box=None)
    for r in runs:
        style = STATE_STYLE.get(str(r.state), "white")
        table.add_row(r.id, r.agent, f"[{style}]{r.state}[/{style}]", str(r.depth),
                      when(r.created_at), r.error_code or "")
    return table


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


def approvals_table(items: list[ApprovalRecord]) -> Table:
    table = Table("id", "run", "action", "arguments", "reason", "status", "decided by", box=None)
    for a in items:
        table.add_row(a.id, a.run_id, a.action, short(a.arguments, 50), short(a.reason, 40),
                      str(a.status), a.decided_by or "")
    return table


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


def budget_line(used: dict[str, float], limits: dict[str, float]) -> str:
    parts = []
    for resource in ("steps", "tool_calls", "tokens", "cost"):
        value = used.get(resource, 0.0)
        limit = limits.get(resource)
        shown = f"{value:.6f}".rstrip("0").rstrip(".") if resource == "cost" else f"{value:g}"
        parts.append(f"{resource} {shown}" + (f"/{limit:g}" if limit is not None else ""))
    return "budget used (whole tree): " + " · ".join(parts)

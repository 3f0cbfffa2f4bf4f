"""Offline tools for the bundled demo: a small note corpus, date arithmetic, a calculator."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from datetime import date

from pydantic import BaseModel

from alpaca_engine.tools.decorator import tool

NOTES = {
    "launch-1.0": (
        "Alpaca 1.0 launch",
        "Alpaca 1.0 shipped on 2026-09-14. Tool calls now run one at a time in the model's "
        "order, every step is journaled, and a crashed worker's runs resume elsewhere.",
    ),
    "roadmap": (
        "Roadmap after 1.0",
        "Next: MCP tool servers, Redis-coordinated circuit breakers, and a supervisor inbox "
        "for approval gates.",
    ),
    "oncall": (
        "On-call handbook",
        "If a run is stuck, `alpaca doctor` lists orphaned runs; `alpaca runs resume` "
        "continues one from its journal.",
    ),
}


class NoteHit(BaseModel):
    note_id: str
    title: str
    score: int


class Note(BaseModel):
    note_id: str
    title: str
    body: str


@tool(capabilities=["read:notes"])
def search_notes(query: str, limit: int = 3) -> list[NoteHit]:
    """Search the team's notes by keywords; best matches first."""
    words = [w for w in query.lower().split() if w]
    hits = []
    for note_id, (title, body) in NOTES.items():
        text = f"{title} {body}".lower()
        score = sum(text.count(w) for w in words)
        if score:
            hits.append(NoteHit(note_id=note_id, title=title, score=score))
    hits.sort(key=lambda h: (-h.score, h.note_id))
    return hits[:limit]


@tool(capabilities=["read:notes"])
def read_note(note_id: str) -> Note:
    """Read one note in full."""
    if note_id not in NOTES:
        raise KeyError(f"no note {note_id!r}")
    title, body = NOTES[note_id]
    return Note(note_id=note_id, title=title, body=body)


@tool(capabilities=["compute"])
def days_between(start: date, end: date) -> int:
    """Whole days from START to END (ISO dates)."""
    return (end - start).days


_OPS: dict[type[ast.AST], Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow, ast.USub: operator.neg,
}


@tool(capabilities=["compute"])
def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression (+ - * / ** and parentheses)."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](ev(node.operand)))
        raise ValueError("only numbers and + - * / ** are allowed")

    return ev(ast.parse(expression, mode="eval").body)

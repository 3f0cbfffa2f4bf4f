"""Tools of the notes example: search and read Markdown notes next to this file, and do
arithmetic. No network needed."""

from __future__ import annotations

import ast
import operator
import re
from pathlib import Path

from pydantic import BaseModel, Field

from alpaca_engine import tool

NOTES_DIR = Path(__file__).parent / "notes"
STOPWORDS = frozenset([
    "a", "an", "and", "are", "at", "did", "does", "do", "for", "how", "in", "is", "it", "of",
    "on", "or", "the", "to", "what", "when", "where", "which", "who", "why", "with",
])


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]


class Hit(BaseModel):
    note: str = Field(description="note file name without .md")
    title: str
    score: int


@tool(capabilities=["read:notes"])
def search_notes(query: str, limit: int = 3) -> list[Hit]:
    """Find notes containing the query's words, best matches first."""
    wanted = set(words(query))
    hits = []
    for path in sorted(NOTES_DIR.glob("*.md")):
        score = sum(1 for w in words(path.read_text()) if w in wanted)
        if score:
            title = path.read_text().splitlines()[0].lstrip("# ").strip()
            hits.append(Hit(note=path.stem, title=title, score=score))
    return sorted(hits, key=lambda h: -h.score)[:limit]


@tool(capabilities=["read:notes"])
def read_note(note: str) -> str:
    """Return the full Markdown text of one note."""
    path = NOTES_DIR / f"{note}.md"
    if not re.fullmatch(r"[\w-]+", note) or not path.exists():
        raise FileNotFoundError(f"no note named {note!r}")
    return path.read_text()


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


@tool(capabilities=["compute"])
def calculate(expression: str) -> float:
    """Evaluate + - * / arithmetic on numbers."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        raise ValueError("only numbers and + - * / are allowed")

    return ev(ast.parse(expression, mode="eval").body)

"""Tools and model functions that the workflow-loader tests name with ``wf_tools:ATTR``."""

from __future__ import annotations

from collections.abc import Sequence

from alpaca_engine.models.base import Message, ToolSpec
from alpaca_engine.tools.breaker import BreakerPolicy
from alpaca_engine.tools.decorator import tool
from alpaca_engine.tools.retry import RetryPolicy


@tool(capabilities=["math"], timeout=5, approval="required",
      retry=RetryPolicy(max_attempts=2), breaker=BreakerPolicy(failure_threshold=2))
def add(a: int, b: int) -> int:
    """Add two integers.

    The second paragraph is not part of the description.
    """
    return a + b


def multiply(a: float, b: float = 1.0) -> float:
    """Multiply two numbers."""
    return a * b


async def search_web(query: str, limit: int = 3) -> list[str]:
    """Search the web (canned results)."""
    return [f"{query} #{i}" for i in range(limit)]


def search_docs(query: str) -> list[str]:
    """Search the docs (canned results)."""
    return [query]


def reply(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> str:
    """A FunctionModel body: echo the last user message and the tools it was shown."""
    last = next(m.content for m in reversed(messages) if m.role == "user")
    return f"{last} | {','.join(t.name for t in tools)}"


NOT_CALLABLE = 42


class NotATool:
    """A class is callable but is neither a function nor a Tool."""

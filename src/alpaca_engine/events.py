"""Progress events the runner emits for live displays (CLI, SSE). Not the audit log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
EventSink = Callable[[Event], None]


def discard(event: Event) -> None:
    """The default sink."""

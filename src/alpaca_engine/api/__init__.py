"""The HTTP API (FastAPI): runs, approvals, audit, catalog, health and metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """``create_app`` on first use: FastAPI's import is not a cost the CLI's other commands
    (which only borrow the API's pydantic models) should pay."""
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)

"""The HTTP API (FastAPI): runs, approvals, audit, catalog, health and metrics."""

from .app import create_app

__all__ = ["create_app"]

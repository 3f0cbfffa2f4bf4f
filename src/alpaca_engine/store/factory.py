"""Pick the store implementation from the database URL."""

from __future__ import annotations

from ..faults import DEFAULT_CONNECT_TIMEOUT, check_database_url
from .base import Store
from .sqlite import SQLiteStore


def make_store(url: str, audit_key: bytes | None = None, *,
               connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Store:
    """A store for ``url`` (not yet open); a malformed URL raises
    :class:`~alpaca_engine.faults.MalformedUrl` naming the forms that work."""
    scheme = check_database_url(url)
    if scheme == "sqlite":
        return SQLiteStore(url, audit_key=audit_key)
    if scheme == "postgresql":
        from .postgres import PostgresStore  # lazy: SQLite users never load psycopg

        return PostgresStore(url, audit_key=audit_key, connect_timeout=connect_timeout)
    from .mongo import MongoStore  # lazy: only MongoDB users load the driver

    return MongoStore(url, audit_key=audit_key, connect_timeout=connect_timeout)

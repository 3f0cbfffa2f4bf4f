"""Pick the store implementation from the database URL."""

from __future__ import annotations

from .base import Store
from .sqlite import SQLiteStore


def make_store(url: str, audit_key: bytes | None = None) -> Store:
    if url.startswith("sqlite:") or url == ":memory:":
        return SQLiteStore(url, audit_key=audit_key)
    scheme = url.split(":", 1)[0]
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore  # lazy: SQLite users never load psycopg

        return PostgresStore(url, audit_key=audit_key)
    if scheme in ("mongodb", "mongodb+srv"):
        from .mongo import MongoStore  # lazy: only MongoDB users load the driver

        return MongoStore(url, audit_key=audit_key)
    raise ValueError(f"unsupported database URL scheme {scheme!r} "
                     "(supported: sqlite, postgresql, mongodb)")

"""The real PostgreSQL for tests: its URL, an admin connection, and a throwaway schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg import sql

from tests.conftest import service_unavailable

PG_URL = os.environ.get("ALPACA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


async def pg_admin() -> psycopg.AsyncConnection[tuple[object, ...]]:
    """An autocommit connection; skips (fails under CI=true) when the server is down."""
    try:
        return await psycopg.AsyncConnection.connect(PG_URL, autocommit=True,
                                                     connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_unavailable("PostgreSQL", str(exc).strip())
        raise


@asynccontextmanager
async def pg_schema() -> AsyncIterator[tuple[str, psycopg.AsyncConnection[tuple[object, ...]]]]:
    """A fresh schema name (dropped afterwards, with everything in it) and the admin
    connection that drops it."""
    admin = await pg_admin()
    name = f"alpaca_test_{uuid.uuid4().hex[:12]}"
    try:
        yield name, admin
    finally:
        await admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                            .format(sql.Identifier(name)))
        await admin.close()

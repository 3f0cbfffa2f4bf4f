"""``alpaca serve``: run the API under uvicorn, refusing to expose an unauthenticated server.

Without any API key the server has no authentication at all (one local admin tenant), so it
may only listen on a loopback address.
"""

from __future__ import annotations

import ipaddress

import uvicorn

from ..collector import tune_collector
from ..config import Settings
from ..coord.factory import make_coordination
from ..faults import mask_url
from ..store.factory import make_store
from .app import DEFAULT_BODY_LIMIT, create_app

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class BindRefused(Exception):
    """The server would listen beyond loopback without authentication."""


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def keys_exist(settings: Settings) -> bool:
    store = make_store(settings.database_url, settings.audit_key_bytes(),
                       connect_timeout=settings.connect_timeout)
    await store.open()
    try:
        return bool(await store.list_api_keys())
    finally:
        await store.close()


async def preflight(settings: Settings) -> None:
    """Open the store (applying migrations) and ping Redis once, so an unusable one stops
    ``alpaca serve`` with its one-line fault before anything listens or logs."""
    store = make_store(settings.database_url, settings.audit_key_bytes(),
                       connect_timeout=settings.connect_timeout)
    await store.open()
    await store.close()
    coord = make_coordination(settings.redis_url, connect_timeout=settings.connect_timeout)
    try:
        await coord.check()
    finally:
        await coord.close()


async def check_bind(settings: Settings, host: str) -> None:
    if is_loopback(host) or await keys_exist(settings):
        return
    raise BindRefused(
        f"no API key exists in {mask_url(settings.database_url)}, so the server would run without "
        f"authentication; it only listens on 127.0.0.1 then, not {host}. Create a key first "
        "(alpaca keys create --tenant T --role admin) or use --host 127.0.0.1")


async def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000,
                worker: bool = True, workflows: list[str] | None = None,
                log_level: str = "info", body_limit: int = DEFAULT_BODY_LIMIT) -> None:
    """Check the bind address, then serve until SIGINT/SIGTERM (uvicorn drains)."""
    await check_bind(settings, host)
    app = create_app(settings, embedded_worker=worker, workflows=workflows,
                     body_limit=body_limit)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            proxy_headers=False)
    tune_collector()
    await uvicorn.Server(config).serve()

"""The FastAPI application: lifespan wiring (store, coordination, engine, embedded worker).

``create_app`` takes ready-made dependencies too, so tests (and embedders) can share a store
or an engine with the app; whatever the app opens itself, it closes on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI

from ..config import Settings
from ..coord.factory import make_coordination
from ..engine import Engine
from ..store.base import Store
from ..store.factory import make_store
from ..telemetry.metrics import METRICS
from ..ui import router as ui_router
from ..worker import Worker
from ..workflows.loader import resolve_workflow
from ..workflows.policy import build_catalog, catalog_modules
from . import openapi as openapi_document
from .auth import Authenticator
from .problems import (
    BodyLimitMiddleware,
    InternalErrorMiddleware,
    install_problem_handlers,
)
from .routes import approvals, catalog, ops, runs
from .routes_threads import threads as threads_router
from .routes_workflows import workflows as workflows_router
from .state import ApiState, LocalDispatcher, MetricsCache, ServedWorkflows, workflow_ref

log = logging.getLogger("alpaca.api")

DEFAULT_BODY_LIMIT = 1024 * 1024
DEFAULT_WORKFLOWS = ("builtin:demo",)


def _version() -> str:
    try:
        return version("alpaca-engine")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def load_served(names: list[str] | tuple[str, ...]) -> ServedWorkflows:
    """Load every served workflow up front: a broken file stops startup, not a request."""
    served = ServedWorkflows(workflows=[])
    for name in names:
        workflow = resolve_workflow(workflow_ref(name))
        if all(w.ref != workflow.ref for w in served.workflows):
            served.workflows.append(workflow)
        served.aliases[name] = workflow
    return served


def _report_worker_exit(task: asyncio.Task[None]) -> None:
    """Say at once when the embedded worker dies, not only at shutdown."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the embedded worker stopped: %r; runs wait for another worker",
                  task.exception())


async def _stop_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    """Stop claiming, let in-flight runs finish for a while, release the rest."""
    worker.stop()
    with contextlib.suppress(Exception):  # already reported by _report_worker_exit
        await task


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    engine: Engine | None = None,
    embedded_worker: bool = True,
    workflows: list[str] | None = None,
    body_limit: int = DEFAULT_BODY_LIMIT,
) -> FastAPI:
    """The HTTP API. ``store``/``engine`` given here are used as they are and not closed."""
    cfg = settings or Settings()
    names = tuple(workflows) if workflows else DEFAULT_WORKFLOWS

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            served = load_served(names)
            if engine is not None:
                eng = engine
            else:
                the_store = store
                if the_store is None:
                    the_store = make_store(cfg.database_url, cfg.audit_key_bytes(),
                                           connect_timeout=cfg.connect_timeout)
                    await the_store.open()
                    stack.push_async_callback(the_store.close)
                coord = make_coordination(cfg.redis_url, connect_timeout=cfg.connect_timeout)
                stack.push_async_callback(coord.close)
                dispatcher = coord.dispatcher
                if dispatcher is None and embedded_worker:
                    dispatcher = LocalDispatcher()
                eng = Engine(the_store, resolve_workflow, lease_seconds=cfg.lease_seconds,
                             breakers=coord.breakers, events=coord.events,
                             dispatcher=dispatcher, tenant_policies=cfg.tenant_policies(),
                             max_run_attempts=cfg.max_run_attempts)
            # What pushed workflows may name: the catalog modules and the served workflows.
            eng.registry.catalog = build_catalog(served.workflows, catalog_modules())
            auth = Authenticator(eng.store)
            await auth.refresh()
            cache = MetricsCache(eng.store)
            METRICS.set_orphan_source(cache.orphan_count)
            METRICS.set_state_source(cache.state_counts)
            stack.callback(_detach_metrics, cache)
            app.state.alpaca = ApiState(settings=cfg, store=eng.store, engine=eng,
                                        served=served, auth=auth, metrics=cache)
            if embedded_worker:
                worker = Worker(eng, concurrency=cfg.worker_concurrency,
                                poll_interval=cfg.poll_interval)
                task = asyncio.create_task(worker.run(), name="alpaca-embedded-worker")
                task.add_done_callback(_report_worker_exit)
                stack.push_async_callback(_stop_worker, worker, task)
            log.info("serving %s (auth %s, worker %s)", ", ".join(w.ref for w in served.workflows),
                     "on" if auth.enabled else "off (local mode)",
                     "embedded" if embedded_worker else "external")
            yield

    app = FastAPI(
        title="Alpaca Agent Engine",
        version=_version(),
        summary="Run governed, durable, auditable AI agents.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=body_limit)
    app.add_middleware(InternalErrorMiddleware)
    for router in (runs, threads_router, approvals, workflows_router, catalog, ops, ui_router):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if not app.openapi_schema:
            app.openapi_schema = openapi_document.build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _detach_metrics(cache: MetricsCache) -> None:
    """Stop reading a closed store at scrape time (unless another app took over since)."""
    if getattr(METRICS, "_orphan_count", None) == cache.orphan_count:
        METRICS.set_orphan_source(None)
        METRICS.set_state_source(None)

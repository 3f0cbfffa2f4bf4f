"""Ready-made tools for the example workflows (search, research and notification agents).

Each tool is an ``@tool`` object with input/output JSON Schemas and capability tags; refer to
it from a workflow file as ``alpaca_engine.toolkit:NAME``.

=================== ================ ========= ===================================================
tool                capability       approval  what
=================== ================ ========= ===================================================
fetch_page          ``net:fetch``    never     GET a page, readable text (trafilatura), size caps,
                                               SSRF guard; 429/5xx retried
search_documents    ``search:local`` never     full-text search (SQLite FTS5, bm25, snippets) of
                                               the index at ``ALPACA_SEARCH_INDEX``
web_search          ``net:search``   never     SearXNG / Brave / Tavily by ``ALPACA_SEARCH_*``;
                                               falls back to the local index (``source: local``)
notify_slack        ``notify:slack`` required  post to ``ALPACA_SLACK_WEBHOOK_URL`` once per step
                                               (idempotency ledger), URL kept secret
=================== ================ ========= ===================================================

Helpers: :class:`LocalIndex` and :func:`index_directory` build the local index;
:class:`IdempotencyLedger` lets any tool run its side effect once per idempotency key.

Environment: ``ALPACA_FETCH_ALLOW_PRIVATE`` (allow private/loopback targets, default off),
``ALPACA_FETCH_MAX_BYTES``, ``ALPACA_SEARCH_INDEX``, ``ALPACA_SEARCH_PROVIDER``,
``ALPACA_SEARCH_URL``, ``ALPACA_SEARCH_API_KEY`` (secret), ``ALPACA_SLACK_WEBHOOK_URL``
(secret), ``ALPACA_IDEMPOTENCY_DB``.
"""

from __future__ import annotations

from ..tools.base import Tool
from .extract import Readable, extract_readable, html_to_text
from .fetch import FetchConfig, Page, fetch_page, fetch_url
from .idempotency import IdempotencyInProgress, IdempotencyLedger
from .net import ToolConfigError, TransientUpstreamError, UpstreamError, URLNotAllowed
from .search import (
    BraveProvider,
    Hit,
    LocalIndex,
    SearchProvider,
    SearchResults,
    SearxngProvider,
    TavilyProvider,
    index_directory,
    provider_from_env,
    search_documents,
    web_search,
)
from .slack import Delivery, notify_slack

TOOLS: tuple[Tool, ...] = (fetch_page, search_documents, web_search, notify_slack)
"""Every toolkit tool, for registering them all at once."""

__all__ = [
    "TOOLS",
    "BraveProvider",
    "Delivery",
    "FetchConfig",
    "Hit",
    "IdempotencyInProgress",
    "IdempotencyLedger",
    "LocalIndex",
    "Page",
    "Readable",
    "SearchProvider",
    "SearchResults",
    "SearxngProvider",
    "TavilyProvider",
    "ToolConfigError",
    "TransientUpstreamError",
    "URLNotAllowed",
    "UpstreamError",
    "extract_readable",
    "fetch_page",
    "fetch_url",
    "html_to_text",
    "index_directory",
    "notify_slack",
    "provider_from_env",
    "search_documents",
    "web_search",
]

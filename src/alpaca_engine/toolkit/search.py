"""Search: a local full-text index (SQLite FTS5) and web search through a configurable provider.

``search_documents`` searches the local index at ``ALPACA_SEARCH_INDEX`` (default
``./alpaca-search.db``), built with :func:`index_directory` or :meth:`LocalIndex.add`.

``web_search`` asks the provider configured by environment:

* ``ALPACA_SEARCH_PROVIDER`` = ``searxng`` | ``brave`` | ``tavily`` (default: ``searxng`` when
  ``ALPACA_SEARCH_URL`` is set, else none);
* ``ALPACA_SEARCH_URL``: the SearXNG instance (required for it), or an override of the Brave /
  Tavily endpoint;
* ``ALPACA_SEARCH_API_KEY``: the key for Brave / Tavily (registered as a secret, so logs mask it).

With no provider it searches the local index instead and says so (``source: "local"``), so
workflows run offline. The provider URL is the operator's, not the model's, so it is not
subject to the fetch SSRF guard (a SearXNG on localhost is a common setup).

Queries are user (model) text: they are reduced to their words, each quoted, before reaching
FTS5, so ``"``, ``NEAR(``, ``*`` or ``AND OR`` cannot raise a syntax error or change the query.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, Field

from ..sqlite_wal import enable_wal
from ..telemetry.logging import register_secret
from ..tools.breaker import BreakerPolicy
from ..tools.decorator import tool
from ..tools.retry import RetryPolicy
from .extract import extract_readable
from .net import USER_AGENT, ToolConfigError, transport_error, upstream_error

__all__ = [
    "BraveProvider",
    "Hit",
    "LocalIndex",
    "SearchProvider",
    "SearchResults",
    "SearxngProvider",
    "TavilyProvider",
    "build_fts_query",
    "index_directory",
    "provider_from_env",
    "search_documents",
    "web_search",
]

INDEX_ENV = "ALPACA_SEARCH_INDEX"
DEFAULT_INDEX = "./alpaca-search.db"
PROVIDER_ENV = "ALPACA_SEARCH_PROVIDER"
URL_ENV = "ALPACA_SEARCH_URL"
KEY_ENV = "ALPACA_SEARCH_API_KEY"
INDEXED_SUFFIXES = frozenset({".md", ".markdown", ".txt", ".html", ".htm"})

_WORD = re.compile(r"\w+")
_TAG = re.compile(r"<[^>]+>")
_MAX_TERMS = 32


class Hit(BaseModel):
    """One search result. ``score``: higher is better (bm25 for local, provider's otherwise)."""

    title: str
    url: str | None = None
    snippet: str = ""
    doc_id: str | None = None
    score: float | None = None


class SearchResults(BaseModel):
    """Web search results and where they came from (``local`` when no provider is set)."""

    query: str
    source: str
    hits: list[Hit]


# --------------------------------------------------------------------------- local index


def build_fts_query(text: str) -> str | None:
    """An FTS5 query matching any word of ``text``; None if it has no words.

    Each word is a quoted string, so operators and punctuation in ``text`` are plain text.
    """
    terms: list[str] = []
    for word in _WORD.findall(text):
        if word.lower() not in (t.lower() for t in terms):
            terms.append(word)
        if len(terms) >= _MAX_TERMS:
            break
    if not terms:
        return None
    return " OR ".join(f'"{term}"' for term in terms)


_INDEX_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS documents (
        id INTEGER PRIMARY KEY,
        doc_id TEXT NOT NULL UNIQUE,
        title TEXT NOT NULL,
        url TEXT,
        body TEXT NOT NULL
    )""",
    """CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(
        title, body, content='documents', content_rowid='id',
        tokenize='porter unicode61 remove_diacritics 2'
    )""",
    """CREATE TRIGGER IF NOT EXISTS documents_ai AFTER INSERT ON documents BEGIN
        INSERT INTO documents_fts(rowid, title, body) VALUES (new.id, new.title, new.body);
    END""",
    """CREATE TRIGGER IF NOT EXISTS documents_ad AFTER DELETE ON documents BEGIN
        INSERT INTO documents_fts(documents_fts, rowid, title, body)
        VALUES ('delete', old.id, old.title, old.body);
    END""",
    """CREATE TRIGGER IF NOT EXISTS documents_au AFTER UPDATE ON documents BEGIN
        INSERT INTO documents_fts(documents_fts, rowid, title, body)
        VALUES ('delete', old.id, old.title, old.body);
        INSERT INTO documents_fts(rowid, title, body) VALUES (new.id, new.title, new.body);
    END""",
)

_UPSERT = """
INSERT INTO documents (doc_id, title, url, body) VALUES (?, ?, ?, ?)
ON CONFLICT(doc_id) DO UPDATE SET title = excluded.title, url = excluded.url,
    body = excluded.body
"""

_SEARCH = """
SELECT d.doc_id, d.title, d.url,
       snippet(documents_fts, 1, '**', '**', '…', 16),
       bm25(documents_fts, 4.0, 1.0) AS rank
FROM documents_fts JOIN documents AS d ON d.id = documents_fts.rowid
WHERE documents_fts MATCH ?
ORDER BY rank
LIMIT ?
"""


class LocalIndex:
    """A full-text index in one SQLite file: bm25 ranking (title weighs 4x) and snippets.

    Every operation opens its own connection, so one index is safe to share between threads
    and processes (WAL lets readers run while a writer adds documents).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as conn:
            for statement in _INDEX_SCHEMA:
                conn.execute(statement)
        with closing(self._connect()) as conn:
            enable_wal(conn)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def add(self, doc_id: str, title: str, text: str, url: str | None = None) -> None:
        """Add or replace the document ``doc_id``."""
        self.add_many([(doc_id, title, text, url)])

    def add_many(self, docs: Iterable[tuple[str, str, str, str | None]]) -> int:
        """Add or replace ``(doc_id, title, text, url)`` documents in one transaction."""
        count = 0
        with self._transaction() as conn:
            for doc_id, title, text, url in docs:
                conn.execute(_UPSERT, (doc_id, title, url, text))
                count += 1
        return count

    def remove(self, doc_id: str) -> bool:
        """Delete ``doc_id``; False if it was not indexed."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,)).rowcount > 0

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT count(*) FROM documents").fetchone()
        return int(row[0])

    def search(self, query: str, limit: int = 5) -> list[Hit]:
        """Best ``limit`` documents for ``query`` (any of its words), best first."""
        match = build_fts_query(query)
        if match is None or limit < 1:
            return []
        with closing(self._connect()) as conn:
            rows = conn.execute(_SEARCH, (match, min(limit, 100))).fetchall()
        return [
            Hit(doc_id=doc_id, title=title, url=url, snippet=snippet, score=-rank)
            for doc_id, title, url, snippet, rank in rows
        ]


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines()[:50]:
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def index_directory(
    path: str | os.PathLike[str], index: LocalIndex, *, max_bytes: int = 5_000_000
) -> int:
    """Index every .md/.txt/.html file under ``path`` (doc id = relative path); return count.

    HTML goes through the same readable-text extraction as ``fetch_page``. Hidden files and
    directories (``.git`` ...) are skipped; documents of deleted files are not removed.
    """
    root = Path(path)
    docs: list[tuple[str, str, str, str | None]] = []
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if file.suffix.lower() not in INDEXED_SUFFIXES or not file.is_file():
            continue
        with file.open("rb") as fh:
            raw = fh.read(max_bytes).decode("utf-8", errors="replace")
        title: str | None
        if file.suffix.lower() in {".html", ".htm"}:
            readable = extract_readable(raw)
            title, text = readable.title, readable.text
        elif file.suffix.lower() in {".md", ".markdown"}:
            title, text = _markdown_title(raw), raw
        else:
            title, text = None, raw
        docs.append((rel.as_posix(), title or file.stem, text, None))
    return index.add_many(docs)


def _index_from_env(why: str = "") -> LocalIndex:
    path = os.environ.get(INDEX_ENV) or DEFAULT_INDEX
    if not Path(path).is_file():
        raise ToolConfigError(
            f"{why}no local search index at {path!r}; build one with "
            f"alpaca_engine.toolkit.index_directory or set {INDEX_ENV}"
        )
    return LocalIndex(path)


# --------------------------------------------------------------------------- web providers


class SearchProvider(Protocol):
    """A web search backend. ``name`` goes into ``SearchResults.source``."""

    name: str

    async def search(self, query: str, limit: int) -> list[Hit]: ...


def _plain(text: Any) -> str:
    """Provider snippets may carry <strong> tags and entities; the model wants plain text."""
    return html.unescape(_TAG.sub("", str(text or ""))).strip()


async def _request_json(
    name: str, method: str, url: str, http_timeout: float, **kwargs: Any
) -> Any:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json",
               **kwargs.pop("headers", {})}
    what = f"search provider {name}"
    try:
        async with httpx.AsyncClient(timeout=http_timeout) as client:
            resp = await client.request(method, url, headers=headers, **kwargs)
    except httpx.TransportError as exc:
        raise transport_error(what, exc) from None
    if resp.status_code >= 400:
        raise upstream_error(f"{what} answered HTTP {resp.status_code}", status=resp.status_code)
    try:
        return resp.json()
    except ValueError:
        raise upstream_error(f"{what} answered with invalid JSON", transient=False) from None


def _hits(items: Any, snippet_key: str, limit: int) -> list[Hit]:
    out: list[Hit] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not item.get("url"):
            continue
        score = item.get("score")
        out.append(Hit(title=_plain(item.get("title")) or str(item["url"]), url=str(item["url"]),
                       snippet=_plain(item.get(snippet_key)),
                       score=float(score) if isinstance(score, int | float) else None))
        if len(out) >= limit:
            break
    return out


class SearxngProvider:
    """A SearXNG instance (or anything answering its ``/search?format=json`` API)."""

    name = "searxng"

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 15.0) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/search") else base + "/search"
        self.api_key = api_key
        self.timeout = timeout

    async def search(self, query: str, limit: int) -> list[Hit]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        data = await _request_json(self.name, "GET", self.url, self.timeout, headers=headers,
                                   params={"q": query, "format": "json"})
        return _hits(data.get("results") if isinstance(data, dict) else None, "content", limit)


class BraveProvider:
    """The Brave Search web API (``X-Subscription-Token`` header)."""

    name = "brave"
    default_url = "https://api.search.brave.com/res/v1/web/search"

    def __init__(self, api_key: str, url: str | None = None, timeout: float = 15.0) -> None:
        self.url = url or self.default_url
        self.api_key = api_key
        self.timeout = timeout

    async def search(self, query: str, limit: int) -> list[Hit]:
        data = await _request_json(self.name, "GET", self.url, self.timeout,
                                   headers={"X-Subscription-Token": self.api_key},
                                   params={"q": query, "count": limit})
        web = data.get("web") if isinstance(data, dict) else None
        return _hits(web.get("results") if isinstance(web, dict) else None, "description", limit)


class TavilyProvider:
    """The Tavily search API (bearer key, JSON body)."""

    name = "tavily"
    default_url = "https://api.tavily.com/search"

    def __init__(self, api_key: str, url: str | None = None, timeout: float = 20.0) -> None:
        self.url = url or self.default_url
        self.api_key = api_key
        self.timeout = timeout

    async def search(self, query: str, limit: int) -> list[Hit]:
        data = await _request_json(self.name, "POST", self.url, self.timeout,
                                   headers={"Authorization": f"Bearer {self.api_key}"},
                                   json={"query": query, "max_results": limit})
        return _hits(data.get("results") if isinstance(data, dict) else None, "content", limit)


def provider_from_env() -> SearchProvider | None:
    """The provider the environment configures, or None (then search the local index)."""
    kind = (os.environ.get(PROVIDER_ENV) or "").strip().lower()
    url = (os.environ.get(URL_ENV) or "").strip() or None
    key = (os.environ.get(KEY_ENV) or "").strip() or None
    register_secret(key)
    if not kind:
        kind = "searxng" if url else ""
    if not kind or kind == "local":
        return None
    if kind == "searxng":
        if url is None:
            raise ToolConfigError(f"{PROVIDER_ENV}=searxng needs {URL_ENV}")
        return SearxngProvider(url, key)
    if kind in {"brave", "tavily"}:
        if key is None:
            raise ToolConfigError(f"{PROVIDER_ENV}={kind} needs {KEY_ENV}")
        return BraveProvider(key, url) if kind == "brave" else TavilyProvider(key, url)
    raise ToolConfigError(
        f"unknown {PROVIDER_ENV} {kind!r}: use searxng, brave, tavily or local"
    )


# --------------------------------------------------------------------------- tools


@tool(capabilities=["search:local"], timeout=30.0)
def search_documents(
    query: str = Field(min_length=1, max_length=1000, description="words to look for"),
    limit: int = Field(5, ge=1, le=50),
) -> list[Hit]:
    """Search the local document index (full text, bm25 ranking, highlighted snippets)."""
    return _index_from_env().search(query, limit)


@tool(
    capabilities=["net:search"],
    retry=RetryPolicy(max_attempts=3, initial_delay=0.5, max_delay=5.0),
    breaker=BreakerPolicy(),
    timeout=45.0,
)
async def web_search(
    query: str = Field(min_length=1, max_length=500, description="the search query"),
    limit: int = Field(5, ge=1, le=20),
) -> SearchResults:
    """Search the web through the configured provider; without one, the local index.

    ``source`` names where the hits came from; ``local`` means no web provider is configured.
    """
    provider = provider_from_env()
    if provider is None:
        why = f"no web search provider is configured ({URL_ENV}, {PROVIDER_ENV}) and "
        hits = await asyncio.to_thread(lambda: _index_from_env(why).search(query, limit))
        return SearchResults(query=query, source="local", hits=hits)
    return SearchResults(query=query, source=provider.name,
                         hits=await provider.search(query, limit))

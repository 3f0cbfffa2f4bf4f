"""LocalIndex (SQLite FTS5), index_directory, search_documents and web_search providers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from alpaca_engine.telemetry.logging import clear_secrets, redact_text
from alpaca_engine.toolkit import (
    LocalIndex,
    SearxngProvider,
    ToolConfigError,
    UpstreamError,
    index_directory,
    provider_from_env,
    search_documents,
    web_search,
)
from alpaca_engine.toolkit.search import build_fts_query
from alpaca_engine.tools.base import ToolContext
from alpaca_engine.tools.retry import default_is_transient
from tests.unit.toolkit_fixtures.server import LocalServer, Reply, serve

DOCS = Path(__file__).parent / "toolkit_fixtures" / "docs"
CTX = ToolContext(run_id="r", step=1, idempotency_key="r:1")
SEARCH_ENV = ("ALPACA_SEARCH_PROVIDER", "ALPACA_SEARCH_URL", "ALPACA_SEARCH_API_KEY")


@pytest.fixture(autouse=True)
def _no_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in SEARCH_ENV:
        monkeypatch.delenv(name, raising=False)
    yield
    clear_secrets()


@pytest.fixture
def index(tmp_path: Path) -> LocalIndex:
    idx = LocalIndex(tmp_path / "idx" / "search.db")
    idx.add("fibre", "Alpaca fibre", "Alpaca fibre is warm, soft and contains no lanolin. "
            "Alpacas are shorn once a year.", url="https://example.org/fibre")
    idx.add("llama", "Llamas", "Llamas are pack animals. They are larger than an alpaca.")
    idx.add("tea", "Green tea", "Green tea is brewed at 80 degrees for two minutes.")
    idx.add("shearing", "Shearing day", "Shearing alpacas: the fibre of the blanket is "
            "kept apart from the seconds. Alpaca fibre quality depends on the animal's age.")
    return idx


# --------------------------------------------------------------------------- LocalIndex


def test_ranking_prefers_more_and_title_matches(index: LocalIndex) -> None:
    hits = index.search("alpaca fibre", limit=10)
    ids = [h.doc_id for h in hits]
    assert ids[0] == "fibre"  # both words, and in the title
    assert set(ids) == {"fibre", "shearing", "llama"}  # tea matches neither word
    assert ids.index("shearing") < ids.index("llama")
    scores = [h.score or 0 for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert hits[0].url == "https://example.org/fibre"
    assert hits[0].title == "Alpaca fibre"


def test_snippet_highlights_terms(index: LocalIndex) -> None:
    [hit] = index.search("lanolin")
    assert "**lanolin**" in hit.snippet
    # porter stemming: "shorn"/"shearing" are different stems, "alpacas" matches "alpaca"
    assert {h.doc_id for h in index.search("alpacas")} >= {"fibre", "shearing"}


def test_limit_upsert_and_remove(index: LocalIndex) -> None:
    assert len(index.search("alpaca", limit=1)) == 1
    assert len(index) == 4
    index.add("tea", "Black tea", "Black tea is brewed with boiling water.")
    assert len(index) == 4
    assert index.search("green") == []
    assert [h.title for h in index.search("boiling")] == ["Black tea"]
    assert index.remove("tea") is True
    assert index.remove("tea") is False
    assert index.search("boiling") == []
    assert len(index) == 3


@pytest.mark.parametrize("query", [
    '"', 'NEAR(', "*", "AND OR", "AND", "NOT alpaca", "alpaca*", '"unbalanced', "a AND (b",
    "title:alpaca", "^alpaca", "-alpaca", "'); DROP TABLE documents; --", "{title body}: x",
    "NEAR(alpaca fibre, 2)", "", "   ", "💥🦙", "alpaca\x00fibre", "+ - ( ) : ^ ~",
])
def test_hostile_queries_do_not_crash(index: LocalIndex, query: str) -> None:
    hits = index.search(query)
    assert isinstance(hits, list)
    assert len(index) == 4


def test_operator_words_are_plain_words(index: LocalIndex) -> None:
    index.add("ops", "Boolean words", "AND OR NOT NEAR are just words here")
    hits = index.search("AND OR")
    assert hits[0].doc_id == "ops"  # both words match; "and" in prose matches too
    assert "**AND** **OR**" in hits[0].snippet
    assert {h.doc_id for h in index.search("NOT alpaca")} >= {"ops", "fibre"}


def test_build_fts_query_quotes_every_term() -> None:
    assert build_fts_query('alpaca "fibre" NEAR(x*') == '"alpaca" OR "fibre" OR "NEAR" OR "x"'
    assert build_fts_query("Alpaca alpaca ALPACA") == '"Alpaca"'
    assert build_fts_query('" * ( )') is None
    assert build_fts_query(" ".join(f"w{i}" for i in range(100))).count('"') == 64


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    idx = LocalIndex(tmp_path / "shared.db")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            other = LocalIndex(tmp_path / "shared.db")  # separate handle, same file
            for i in range(10):
                other.add(f"{n}-{i}", f"doc {n}", f"alpaca number {n} {i}")
                idx.search("alpaca")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(idx) == 40


def test_index_directory(tmp_path: Path) -> None:
    idx = LocalIndex(tmp_path / "dir.db")
    assert index_directory(DOCS, idx) == 3
    by_id = {h.doc_id: h for h in idx.search("alpaca alpacas llamas shearing", limit=10)}
    assert set(by_id) == {"alpaca.md", "llama.txt", "sub/guide.html"}
    assert by_id["alpaca.md"].title == "Alpaca care"  # markdown heading
    assert by_id["llama.txt"].title == "llama"  # file stem
    assert by_id["sub/guide.html"].title == "Shearing guide"  # <title>
    assert idx.search("navigation menu entry") == []  # html boilerplate was not indexed
    assert idx.search("secret hidden") == []  # dot-directories are skipped
    assert idx.search("json") == []  # other extensions are skipped
    assert index_directory(DOCS, idx) == 3 and len(idx) == 3  # re-indexing replaces


# --------------------------------------------------------------------------- tools


async def test_search_documents_tool(
    index: LocalIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert search_documents.capabilities == frozenset({"search:local"})
    monkeypatch.setenv("ALPACA_SEARCH_INDEX", str(index.path))
    result = await search_documents.invoke({"query": 'alpaca "fibre', "limit": 2}, CTX)
    assert search_documents.output_errors(result) == []
    assert [h["doc_id"] for h in result] == ["fibre", "shearing"]
    assert "**" in result[0]["snippet"]


async def test_search_documents_without_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_SEARCH_INDEX", str(tmp_path / "absent.db"))
    with pytest.raises(ToolConfigError, match="no local search index"):
        await search_documents.invoke({"query": "x"}, CTX)
    assert not (tmp_path / "absent.db").exists()  # a search never creates an empty index


async def test_web_search_falls_back_to_local_index(
    index: LocalIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert web_search.capabilities == frozenset({"net:search"})
    monkeypatch.setenv("ALPACA_SEARCH_INDEX", str(index.path))
    result = await web_search.invoke({"query": "green tea"}, CTX)
    assert web_search.output_errors(result) == []
    assert result["source"] == "local"
    assert result["query"] == "green tea"
    assert [h["doc_id"] for h in result["hits"]] == ["tea"]


async def test_web_search_without_provider_or_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_SEARCH_INDEX", str(tmp_path / "absent.db"))
    with pytest.raises(ToolConfigError, match="no web search provider"):
        await web_search.invoke({"query": "x"}, CTX)


# --------------------------------------------------------------------------- providers

SEARX = {"results": [
    {"title": "Alpaca - Wikipedia", "url": "https://en.wikipedia.org/wiki/Alpaca",
     "content": "The alpaca is a species of <b>South American</b> camelid &amp; more.",
     "score": 3.5},
    {"title": "no url, skipped"},
    {"title": "Alpaca fibre", "url": "https://example.org/fibre", "content": "Warm."},
    {"title": "Third", "url": "https://example.org/3", "content": "x"},
]}
BRAVE = {"web": {"results": [
    {"title": "Brave <strong>alpaca</strong>", "url": "https://b.example/1",
     "description": "An <strong>alpaca</strong> result"},
]}}
TAVILY = {"results": [{"title": "Tavily", "url": "https://t.example/1", "content": "c",
                       "score": 0.9}]}


@pytest.fixture
def providers() -> Iterator[LocalServer]:
    routes: dict[str, Any] = {
        "/search": lambda _r: Reply(body=_json(SEARX), content_type="application/json"),
        "/brave": lambda _r: Reply(body=_json(BRAVE), content_type="application/json"),
        "/tavily": lambda _r: Reply(body=_json(TAVILY), content_type="application/json"),
        "/down": lambda _r: Reply(503, "overloaded", content_type="text/plain"),
        "/forbidden": lambda _r: Reply(401, "bad key", content_type="text/plain"),
        "/garbage": lambda _r: Reply(body="<html>not json</html>"),
    }
    with serve(routes) as srv:
        yield srv


def _json(value: Any) -> str:
    return json.dumps(value)


async def test_searxng_provider(providers: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_SEARCH_URL", providers.base)  # provider inferred: searxng
    result = await web_search.invoke({"query": "alpaca", "limit": 2}, CTX)
    assert web_search.output_errors(result) == []
    assert result["source"] == "searxng"
    hits = result["hits"]
    assert [h["url"] for h in hits] == ["https://en.wikipedia.org/wiki/Alpaca",
                                        "https://example.org/fibre"]
    assert hits[0]["snippet"] == "The alpaca is a species of South American camelid & more."
    assert hits[0]["score"] == 3.5
    query = parse_qs(urlsplit(providers.hits("/search")[0].path).query)
    assert query == {"q": ["alpaca"], "format": ["json"]}


async def test_brave_provider_sends_key_and_strips_tags(
    providers: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "brave")
    monkeypatch.setenv("ALPACA_SEARCH_URL", providers.url("/brave"))
    monkeypatch.setenv("ALPACA_SEARCH_API_KEY", "brave-key-123456")
    result = await web_search.invoke({"query": "alpaca"}, CTX)
    assert result["source"] == "brave"
    assert result["hits"][0]["title"] == "Brave alpaca"
    assert result["hits"][0]["snippet"] == "An alpaca result"
    request = providers.hits("/brave")[0]
    assert request.headers["X-Subscription-Token"] == "brave-key-123456"
    assert parse_qs(urlsplit(request.path).query)["count"] == ["5"]
    assert redact_text("key=brave-key-123456") == "key=***"  # registered as a secret


async def test_tavily_provider_posts_json(
    providers: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "Tavily")
    monkeypatch.setenv("ALPACA_SEARCH_URL", providers.url("/tavily"))
    monkeypatch.setenv("ALPACA_SEARCH_API_KEY", "tvly-secret-abcdef")
    result = await web_search.invoke({"query": "alpaca", "limit": 3}, CTX)
    assert result["source"] == "tavily"
    assert result["hits"][0]["score"] == 0.9
    request = providers.hits("/tavily")[0]
    assert request.method == "POST"
    assert request.json() == {"query": "alpaca", "max_results": 3}
    assert request.headers["Authorization"] == "Bearer tvly-secret-abcdef"


@pytest.mark.parametrize(("path", "status", "transient"), [
    ("/down", 503, True), ("/forbidden", 401, False), ("/garbage", None, False),
])
async def test_provider_errors(
    providers: LocalServer, monkeypatch: pytest.MonkeyPatch, path: str, status: int | None,
    transient: bool,
) -> None:
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "brave")
    monkeypatch.setenv("ALPACA_SEARCH_URL", providers.url(path))
    monkeypatch.setenv("ALPACA_SEARCH_API_KEY", "brave-key-123456")
    with pytest.raises(UpstreamError) as info:
        await web_search.invoke({"query": "alpaca"}, CTX)
    assert info.value.status == status
    assert default_is_transient(info.value) is transient
    assert "brave-key-123456" not in str(info.value)
    assert providers.base not in str(info.value)


async def test_provider_unreachable_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve({}) as srv:
        url = srv.base
    provider = SearxngProvider(url)
    with pytest.raises(UpstreamError) as info:
        await provider.search("alpaca", 3)
    assert default_is_transient(info.value)


def test_provider_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert provider_from_env() is None
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "local")
    assert provider_from_env() is None
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "searxng")
    with pytest.raises(ToolConfigError, match="ALPACA_SEARCH_URL"):
        provider_from_env()
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "brave")
    with pytest.raises(ToolConfigError, match="ALPACA_SEARCH_API_KEY"):
        provider_from_env()
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "bing")
    with pytest.raises(ToolConfigError, match="unknown"):
        provider_from_env()
    monkeypatch.setenv("ALPACA_SEARCH_PROVIDER", "searxng")
    monkeypatch.setenv("ALPACA_SEARCH_URL", "http://searx.local/search/")
    provider = provider_from_env()
    assert isinstance(provider, SearxngProvider) and provider.url == "http://searx.local/search"

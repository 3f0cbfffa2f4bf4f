"""A client's bad input is a 4xx problem on every store, never a 500 (issue 10 §4).

Each test runs on SQLite and on the real PostgreSQL (psycopg refuses NUL in strings, and
SQLite refuses integers past int64), through the real app in-process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from alpaca_engine.api import create_app
from alpaca_engine.api.models import SEQ_MAX
from alpaca_engine.config import Settings
from alpaca_engine.store.base import Store
from alpaca_engine.store.postgres import PostgresStore
from alpaca_engine.store.sqlite import SQLiteStore
from tests.pg import PG_URL, pg_schema

from .test_problems import assert_problem

JSON = {"content-type": "application/json"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(f"sqlite:///{tmp_path}/bad.db")
        await s.open()
        yield s
        await s.close()
        return
    async with pg_schema() as (schema, _admin):
        pg = PostgresStore(PG_URL, schema=schema)
        await pg.open()
        try:
            yield pg
        finally:
            await pg.close()


@pytest.fixture
async def client(store: Store, gated_workflow: Path) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(Settings(database_url="sqlite:///unused.db"), store=store,
                              embedded_worker=False, workflows=[str(gated_workflow)])
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://api.test") as c:
        yield c


async def a_run(c: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await c.post("/v1/runs", json={"agent": "echo", "input": "hi", **body})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def test_audit_after_beyond_int64_is_422(client: httpx.AsyncClient) -> None:
    run = await a_run(client)
    path = f"/v1/runs/{run['id']}/audit"
    body = assert_problem(await client.get(path, params={"after": SEQ_MAX + 1}), 422,
                          "validation_error")
    assert body["errors"][0]["loc"] == ["query", "after"]
    assert_problem(await client.get(path, params={"after": 10**30}), 422, "validation_error")
    at_max = await client.get(path, params={"after": SEQ_MAX})  # the bound itself is fine
    assert at_max.status_code == 200 and at_max.json() == {"items": []}
    assert len((await client.get(path)).json()["items"]) >= 1


async def test_a_nul_in_a_path_id_is_404_on_every_id_route(client: httpx.AsyncClient) -> None:
    run = await a_run(client)
    bad = run["id"] + "%00"
    for method, path, body in [
        ("GET", f"/v1/runs/{bad}", None),
        ("GET", f"/v1/runs/{bad}/steps", None),
        ("GET", f"/v1/runs/{bad}/events", None),
        ("GET", f"/v1/runs/{bad}/audit", None),
        ("GET", f"/v1/runs/{bad}/audit/verify", None),
        ("POST", f"/v1/runs/{bad}/cancel", None),
        ("POST", "/v1/approvals/apr_%00x/decision", {"decision": "approve"}),
    ]:
        r = await client.request(method, path, json=body)
        problem = assert_problem(r, 404, "not_found")
        assert "not found" in problem["detail"], path
    # The real run is untouched and still found.
    assert (await client.get(f"/v1/runs/{run['id']}")).status_code == 200


async def test_a_nul_in_an_id_filter_is_422(client: httpx.AsyncClient) -> None:
    for path, name in [("/v1/runs", "root_id"), ("/v1/runs", "parent_id"),
                       ("/v1/approvals", "run_id")]:
        body = assert_problem(await client.get(path, params={name: "run_\x00"}), 422,
                              "validation_error")
        assert body["errors"][0]["loc"] == ["query", name]


@pytest.mark.parametrize("budget", [
    {"max_steps": True}, {"max_steps": "10"}, {"max_tool_calls": False},
    {"max_tokens": "1000"}, {"max_cost": "0.5"}, {"deadline_seconds": True},
    {"max_steps": 2.0},
])
async def test_budget_fields_are_strict(client: httpx.AsyncClient,
                                        budget: dict[str, Any]) -> None:
    r = await client.post("/v1/runs", json={"agent": "echo", "input": "x", "budget": budget})
    body = assert_problem(r, 422, "validation_error")
    assert body["errors"][0]["loc"][:2] == ["body", "budget"]
    assert (await client.get("/v1/runs")).json()["items"] == []  # nothing was stored


async def test_well_typed_budgets_are_accepted(client: httpx.AsyncClient) -> None:
    run = await a_run(client, budget={"max_steps": 10, "max_cost": 1, "deadline_seconds": 60})
    assert run["budget"]["max_steps"] == 10 and run["budget"]["max_cost"] == 1


async def test_an_idempotency_key_reused_with_another_budget_is_409(
        client: httpx.AsyncClient) -> None:
    body = {"agent": "echo", "input": "once", "budget": {"max_steps": 5}}
    first = await client.post("/v1/runs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    again = await client.post("/v1/runs", json=body, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    for other in ({"max_steps": 6}, {"max_steps": 5, "max_tool_calls": 1}, None):
        changed = {**body, "budget": other}
        r = await client.post("/v1/runs", json=changed, headers={"Idempotency-Key": "k1"})
        problem = assert_problem(r, 409, "idempotency_key_reused")
        assert first.json()["id"] in problem["detail"] and "budget" in problem["detail"]
    # Without a budget the first time, an explicit one later is a different body too.
    plain = await client.post("/v1/runs", json={"agent": "echo", "input": "x"},
                              headers={"Idempotency-Key": "k2"})
    assert plain.status_code == 201
    explicit = await client.post("/v1/runs", json={"agent": "echo", "input": "x",
                                                   "budget": {"max_steps": 25}},
                                 headers={"Idempotency-Key": "k2"})
    assert_problem(explicit, 409, "idempotency_key_reused")
    assert len((await client.get("/v1/runs")).json()["items"]) == 2


@pytest.mark.parametrize("raw", [
    b'{"agent": "echo", "input": "a\\ud800b"}',
    b'{"agent": "echo", "input": "\\udfff"}',
    b'{"agent": "echo", "input": "x\\ude00\\ud83d"}',  # a pair in the wrong order
    b'{"agent": "ech\\ud800o", "input": "x"}',
    b'{"agent": "echo", "input": "x", "workflow": "\\ud800"}',
])
async def test_a_lone_surrogate_is_422_invalid_unicode(client: httpx.AsyncClient,
                                                       raw: bytes) -> None:
    body = assert_problem(await client.post("/v1/runs", content=raw, headers=JSON), 422,
                          "invalid_unicode")
    assert "surrogate" in body["detail"] and body["detail"].startswith("body.")
    assert (await client.get("/v1/runs")).json()["items"] == []


async def test_a_surrogate_pair_is_ordinary_text(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/runs", content=b'{"agent": "echo", "input": "hi \\ud83d\\ude00"}',
                          headers=JSON)
    assert r.status_code == 201, r.text
    shown = await client.get(f"/v1/runs/{r.json()['id']}")
    assert shown.json()["input"] == "hi \U0001f600"


async def test_a_nul_character_in_text_is_422(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.post(
        "/v1/runs", content=b'{"agent": "echo", "input": "a\\u0000b"}', headers=JSON), 422,
        "nul_character")
    assert "U+0000" in body["detail"]


async def test_a_lone_surrogate_in_a_decision_comment_is_422(
        client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/approvals/apr_x/decision", headers=JSON,
                          content=b'{"decision": "approve", "comment": "ok \\ud800"}')
    assert_problem(r, 422, "invalid_unicode")

"""Every error is an RFC 9457 problem document with a stable ``code``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from .conftest import ApiFactory

PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "code"}


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert set(body) >= PROBLEM_KEYS
    assert body["status"] == status and body["code"] == code
    assert body["type"] == f"urn:alpaca:problem:{code}"
    assert body["instance"] == r.request.url.path
    return body


async def test_404_for_unknown_routes_and_ids(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        body = assert_problem(await c.get("/v1/nothing-here"), 404, "not_found")
        assert body["title"] == "Not Found" and "/v1/nothing-here" in body["detail"]
        assert_problem(await c.get("/v1/runs/run_missing"), 404, "not_found")
        assert_problem(await c.post("/v1/approvals/apr_missing/decision",
                                    json={"decision": "approve"}), 404, "not_found")
        assert_problem(await c.delete("/v1/runs"), 405, "method_not_allowed")


async def test_422_for_invalid_input(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        body = assert_problem(await c.post("/v1/runs", json={"agent": 3}), 422,
                              "validation_error")
        locs = [e["loc"] for e in body["errors"]]
        assert ["body", "agent"] in locs and ["body", "input"] in locs
        assert_problem(await c.post("/v1/runs", content=b"{not json",
                                    headers={"content-type": "application/json"}),
                       422, "validation_error")
        assert_problem(await c.get("/v1/runs", params={"state": "sleeping"}), 422,
                       "validation_error")
        assert_problem(await c.get("/v1/runs", params={"limit": 0}), 422, "validation_error")
        assert_problem(await c.post("/v1/approvals/x/decision", json={"decision": "maybe"}),
                       422, "validation_error")


async def test_413_by_content_length_and_by_streamed_bytes(start_api: ApiFactory) -> None:
    async with start_api(body_limit=1024) as api, api.client() as c:
        big = {"agent": "echo", "input": "x" * 2000}
        body = assert_problem(await c.post("/v1/runs", json=big), 413, "payload_too_large")
        assert "1024" in body["detail"]

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"agent": "echo", "input": "'
            for _ in range(10):
                yield b"y" * 200
            yield b'"}'

        streamed = await c.post("/v1/runs", content=chunks(),
                                headers={"content-type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert_problem(streamed, 413, "payload_too_large")
        assert_problem(await c.post("/v1/runs", content=b"{}",
                                    headers={"content-length": "abc",
                                             "content-type": "application/json"}),
                       400, "bad_request")
        assert (await c.post("/v1/runs", json={"agent": "echo", "input": "ok"})).status_code \
            == 201
        assert (await c.get("/v1/runs")).json()["items"][0]["input"] == "ok"


async def test_500_is_a_problem_too(start_api: ApiFactory) -> None:
    async with start_api(worker=False) as api, api.client() as c:
        async def broken(**kw: Any) -> Any:
            raise RuntimeError("the disk is on fire")

        api.store.list_runs = broken  # type: ignore[method-assign]
        body = assert_problem(await c.get("/v1/runs"), 500, "internal_error")
        assert "fire" not in body["detail"]  # no internals leak to clients
        ready = await c.get("/readyz")
        assert_problem(ready, 503, "unavailable")

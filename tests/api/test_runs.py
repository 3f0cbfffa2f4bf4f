"""Runs over HTTP: create (idempotent, optionally waiting), list and filter, steps, cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.helpers import PATIENCE

from .conftest import ApiFactory

QS = {"agent": "researcher", "input": "When did Alpaca 1.0 ship?",
      "workflow": "builtin:quickstart"}


async def wait_state(client: httpx.AsyncClient, run_id: str, *states: str,
                     seconds: float = PATIENCE) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        run: dict[str, Any] = (await client.get(f"/v1/runs/{run_id}")).json()
        if run["state"] in states:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never reached {states}: {run}")
        await asyncio.sleep(0.02)


async def test_create_is_idempotent_per_key_and_wait_returns_the_final_state(
        start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        first = await c.post("/v1/runs?wait=true", json=QS, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 201, first.text
        run = first.json()
        assert first.headers["location"] == f"/v1/runs/{run['id']}"
        assert run["state"] == "succeeded" and "2026-09-14" in run["output"]
        assert run["tenant"] == "local" and run["idempotency_key"] == "k-1"

        again = await c.post("/v1/runs", json=QS, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 200 and again.json()["id"] == run["id"]
        other = await c.post("/v1/runs", json=QS, headers={"Idempotency-Key": "k-2"})
        assert other.status_code == 201 and other.json()["id"] != run["id"]
        plain = await c.post("/v1/runs", json=QS)
        assert plain.status_code == 201 and plain.json()["id"] not in (run["id"],
                                                                        other.json()["id"])
        reused = await c.post("/v1/runs", json={**QS, "input": "something else"},
                              headers={"Idempotency-Key": "k-1"})
        assert reused.status_code == 409 and reused.json()["code"] == "idempotency_key_reused"


async def test_wait_stops_at_a_pending_approval_and_times_out_without_a_worker(
        start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        waiting = await c.post("/v1/runs?wait=true&timeout=300",
                               json={"agent": "announcer", "input": "go"})
        assert waiting.status_code == 201 and waiting.json()["state"] == "waiting"
    async with start_api(worker=False) as api, api.client() as c:
        queued = await c.post("/v1/runs?wait=true&timeout=0.1",
                              json={"agent": "echo", "input": "x"})
        assert queued.status_code == 201 and queued.json()["state"] == "queued"


async def test_the_default_workflow_is_the_first_served_one(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        r = await c.post("/v1/runs?wait=true", json={"agent": "echo", "input": "x"})
        assert r.json()["output"] == "hello from echo"
        assert r.json()["workflow"].endswith("workflow.yaml")
        bad = await c.post("/v1/runs", json={"agent": "nobody", "input": "x"})
        assert bad.status_code == 422 and bad.json()["code"] == "unknown_agent"
        assert "announcer" in bad.json()["detail"]
        other = await c.post("/v1/runs", json={**QS, "workflow": "builtin:nope"})
        assert other.status_code == 422 and other.json()["code"] == "unknown_workflow"


async def test_list_filters_and_steps(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        done = (await c.post("/v1/runs?wait=true", json=QS)).json()
        waiting = (await c.post("/v1/runs?wait=true",
                                json={"agent": "announcer", "input": "go"})).json()
        everything = (await c.get("/v1/runs")).json()["items"]
        assert [r["id"] for r in everything] == [waiting["id"], done["id"]]  # newest first
        by_state = (await c.get("/v1/runs", params={"state": "waiting"})).json()["items"]
        assert [r["id"] for r in by_state] == [waiting["id"]]
        by_agent = (await c.get("/v1/runs", params={"agent": "researcher"})).json()["items"]
        assert [r["id"] for r in by_agent] == [done["id"]]
        by_root = (await c.get("/v1/runs", params={"root_id": done["id"]})).json()["items"]
        assert [r["id"] for r in by_root] == [done["id"]]
        assert (await c.get("/v1/runs", params={"parent_id": done["id"]})).json()["items"] == []
        assert len((await c.get("/v1/runs", params={"limit": 1})).json()["items"]) == 1

        steps = (await c.get(f"/v1/runs/{done['id']}/steps")).json()["items"]
        assert [s["seq"] for s in steps] == list(range(1, len(steps) + 1))
        assert {s["kind"] for s in steps} == {"model", "tool"}
        assert all(s["status"] == "completed" for s in steps)
        one = (await c.get(f"/v1/runs/{done['id']}")).json()
        assert one["id"] == done["id"] and one["state"] == "succeeded"
        assert "lease_owner" not in one  # internals stay internal


async def test_cancel_a_waiting_run(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true",
                            json={"agent": "announcer", "input": "go"})).json()
        r = await c.post(f"/v1/runs/{run['id']}/cancel")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["run"]["state"] == "cancelled"
        assert [x["id"] for x in body["affected"]] == [run["id"]]
        # the cancelled run's approval can no longer be decided
        assert (await c.get("/v1/runs", params={"state": "cancelled"})).json()["items"]


async def test_budget_is_validated_and_applied(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        bad = await c.post("/v1/runs", json={**QS, "budget": {"max_steps": 0}})
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"
        unknown = await c.post("/v1/runs", json={**QS, "budget": {"max_apples": 1}})
        assert unknown.status_code == 422
        tight = await c.post("/v1/runs?wait=true", json={**QS, "budget": {"max_steps": 1}})
        run = tight.json()
        assert run["budget"]["max_steps"] == 1
        assert run["state"] == "failed" and run["error_code"] == "budget_exceeded"

"""Health, readiness, metrics, audit verification, the catalog and the OpenAPI document."""

from __future__ import annotations

import sqlite3

from .conftest import ApiFactory
from .test_runs import QS


async def test_health_ready_and_metrics(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        assert (await c.get("/readyz")).json() == {"status": "ready", "store": "sqlite"}
        await c.post("/v1/runs?wait=true", json={"agent": "announcer", "input": "go"})
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "alpaca_orphaned_runs 0.0" in r.text
        assert 'alpaca_runs_in_state{state="waiting"} 1.0' in r.text


async def test_audit_verify_finds_a_tampered_record(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true", json=QS)).json()
        count = len((await c.get(f"/v1/runs/{run['id']}/audit")).json()["items"])
        ok = (await c.get(f"/v1/runs/{run['id']}/audit/verify")).json()
        assert ok == {"ok": True, "records": count, "head_seq": count, "first_bad_seq": None,
                      "reason": None, "deleted_with": None, "anchor_seq": None}
        after = (await c.get(f"/v1/runs/{run['id']}/audit", params={"after": 3})).json()
        assert [a["seq"] for a in after["items"]] == list(range(4, count + 1))

        db = sqlite3.connect(api.db_url.removeprefix("sqlite:///"))
        with db:
            db.execute("UPDATE audit SET actor='mallory' WHERE run_id=? AND seq=3", (run["id"],))
        db.close()
        bad = (await c.get(f"/v1/runs/{run['id']}/audit/verify")).json()
        assert bad["ok"] is False and bad["first_bad_seq"] == 3 and bad["reason"]


async def test_audit_verify_finds_deleted_records(start_api: ApiFactory) -> None:
    """Loss is tampering: the run row's head names the records deleted from the end."""
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true", json=QS)).json()
        count = len((await c.get(f"/v1/runs/{run['id']}/audit")).json()["items"])
        db = sqlite3.connect(api.db_url.removeprefix("sqlite:///"))
        with db:
            db.execute("DELETE FROM audit WHERE run_id=? AND seq>=?", (run["id"], count - 1))
        lost = (await c.get(f"/v1/runs/{run['id']}/audit/verify")).json()
        assert lost["ok"] is False and lost["head_seq"] == count
        assert lost["first_bad_seq"] == count - 1 and "deleted" in lost["reason"]
        with db:
            db.execute("DELETE FROM audit WHERE run_id=?", (run["id"],))
        db.close()
        gone = (await c.get(f"/v1/runs/{run['id']}/audit/verify")).json()
        assert gone["ok"] is False and gone["first_bad_seq"] == 1 and gone["records"] == 0


async def test_catalog_lists_agents_tools_and_breakers(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        agents = (await c.get("/v1/agents")).json()["items"]
        assert {a["name"] for a in agents} == {"announcer", "echo", "researcher"}
        tools = {t["name"]: t for t in (await c.get("/v1/tools")).json()["items"]}
        assert tools["announce"]["approval"] == "required"
        assert tools["announce"]["input_schema"]["properties"]["message"]["type"] == "string"
        assert "search_notes" in tools and tools["search_notes"]["workflow"] == \
            "builtin:quickstart"
        await c.post("/v1/runs?wait=true", json=QS)
        breakers = (await c.get("/v1/breakers")).json()["items"]
        assert all(b["state"] == "closed" for b in breakers)


async def test_openapi_documents_every_route_with_problem_errors(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        doc = (await c.get("/openapi.json")).json()
        paths = doc["paths"]
        for path in ["/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/steps",
                     "/v1/runs/{run_id}/events", "/v1/runs/{run_id}/cancel", "/v1/approvals",
                     "/v1/approvals/{approval_id}/decision", "/v1/runs/{run_id}/audit",
                     "/v1/runs/{run_id}/audit/verify", "/v1/agents", "/v1/tools",
                     "/v1/breakers", "/healthz", "/readyz", "/metrics"]:
            assert path in paths, path
        create = paths["/v1/runs"]["post"]
        assert {"200", "201", "401", "403", "409", "413", "422"} <= set(create["responses"])
        assert set(create["responses"]["422"]["content"]) == {"application/problem+json"}
        assert set(create["responses"]["201"]["content"]) == {"application/json"}
        events = paths["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
        assert "text/event-stream" in events
        assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"

"""Keys, roles and tenant isolation; local mode without keys."""

from __future__ import annotations

import asyncio

from alpaca_engine.api.auth import create_api_key, hash_key

from .conftest import ApiFactory
from .test_runs import wait_state

KEYS = {"alice": ("acme", "user"), "sue": ("acme", "supervisor"), "root": ("acme", "admin"),
        "bob": ("globex", "admin"), "gina": ("globex", "supervisor")}
GATED = {"agent": "announcer", "input": "go"}


async def test_requests_without_a_valid_key_get_401(start_api: ApiFactory) -> None:
    async with start_api(keys=KEYS) as api, api.client() as anon:
        for method, path in [("GET", "/v1/runs"), ("POST", "/v1/runs"),
                             ("GET", "/v1/approvals"), ("GET", "/v1/tools"),
                             ("GET", "/metrics"), ("GET", "/v1/runs/run_x/events")]:
            r = await anon.request(method, path, json=GATED if method == "POST" else None)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["code"] == "unauthorized"
        bad = await anon.get("/v1/runs", headers={"Authorization": "Bearer alp_not-a-key"})
        assert bad.status_code == 401 and bad.json()["detail"] == "the API key is not valid"
        basic = await anon.get("/v1/runs", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert basic.status_code == 401
        assert (await anon.get("/healthz")).status_code == 200
        assert (await anon.get("/readyz")).json() == {"status": "ready", "store": "sqlite"}


async def test_user_cannot_decide_supervisor_approves_and_the_run_completes(
        start_api: ApiFactory) -> None:
    async with (start_api(keys=KEYS) as api, api.client("alice") as alice,
                api.client("sue") as sue):
        run = (await alice.post("/v1/runs?wait=true", json=GATED)).json()
        assert run["state"] == "waiting" and run["tenant"] == "acme"
        [approval] = (await alice.get("/v1/approvals")).json()["items"]
        assert approval["run_id"] == run["id"] and approval["action"] == "announce"
        assert approval["arguments"] == {"message": "launch at noon"}
        url = f"/v1/approvals/{approval['id']}/decision"

        denied = await alice.post(url, json={"decision": "approve"})
        assert denied.status_code == 403 and denied.json()["code"] == "forbidden"
        ok = await sue.post(url, json={"decision": "approve", "comment": "go ahead"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["status"] == "approved" and ok.json()["decided_by"] == "sue"
        again = await sue.post(url, json={"decision": "reject"})
        assert again.status_code == 409 and again.json()["code"] == "conflict"

        done = await wait_state(alice, run["id"], "succeeded", "failed")
        assert done["state"] == "succeeded" and done["output"] == "announced"
        assert (await alice.get("/v1/approvals")).json()["items"] == []
        decided = (await alice.get("/v1/approvals", params={"status": "approved"})).json()
        assert [a["id"] for a in decided["items"]] == [approval["id"]]
        audit = (await alice.get(f"/v1/runs/{run['id']}/audit")).json()["items"]
        decision = next(a for a in audit if a["kind"] == "approval.decided")
        assert decision["actor"] == "user:sue" and decision["data"]["comment"] == "go ahead"


async def test_a_rejection_reaches_the_agent(start_api: ApiFactory) -> None:
    async with start_api(keys=KEYS) as api, api.client("root") as admin:
        run = (await admin.post("/v1/runs?wait=true", json=GATED)).json()
        [approval] = (await admin.get("/v1/approvals")).json()["items"]
        r = await admin.post(f"/v1/approvals/{approval['id']}/decision",
                             json={"decision": "reject", "comment": "not today"})
        assert r.status_code == 200 and r.json()["status"] == "rejected"
        done = await wait_state(admin, run["id"], "succeeded", "failed")
        steps = (await admin.get(f"/v1/runs/{run['id']}/steps")).json()["items"]
        assert done["state"] == "succeeded"
        assert any((s["error"] or {}).get("code") == "approval_rejected" for s in steps)


async def test_another_tenants_ids_answer_404(start_api: ApiFactory) -> None:
    async with (start_api(keys=KEYS) as api, api.client("alice") as alice,
                api.client("bob") as bob, api.client("gina") as gina):
        run = (await alice.post("/v1/runs?wait=true", json=GATED)).json()
        [approval] = (await alice.get("/v1/approvals")).json()["items"]
        rid = run["id"]
        for path in [f"/v1/runs/{rid}", f"/v1/runs/{rid}/steps", f"/v1/runs/{rid}/audit",
                     f"/v1/runs/{rid}/audit/verify", f"/v1/runs/{rid}/events"]:
            r = await bob.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert r.json()["code"] == "not_found"
        assert (await bob.post(f"/v1/runs/{rid}/cancel")).status_code == 404
        decide = await gina.post(f"/v1/approvals/{approval['id']}/decision",
                                 json={"decision": "approve"})
        assert decide.status_code == 404
        assert (await bob.get("/v1/runs")).json()["items"] == []
        assert (await bob.get("/v1/approvals", params={"status": "all"})).json()["items"] == []
        # tenant A's run is untouched by all of that
        assert (await alice.get(f"/v1/runs/{rid}")).json()["state"] == "waiting"
        # and an idempotency key is per tenant: the same key makes bob his own run
        a = await alice.post("/v1/runs", json=GATED, headers={"Idempotency-Key": "same"})
        b = await bob.post("/v1/runs", json=GATED, headers={"Idempotency-Key": "same"})
        assert a.status_code == b.status_code == 201 and a.json()["id"] != b.json()["id"]


async def test_metrics_need_admin_when_keys_exist(start_api: ApiFactory) -> None:
    async with (start_api(keys=KEYS) as api, api.client("alice") as alice,
                api.client("root") as admin):
        assert (await alice.get("/metrics")).status_code == 403
        r = await admin.get("/metrics")
        assert r.status_code == 200 and "alpaca_orphaned_runs" in r.text


async def test_without_keys_everything_acts_as_the_local_admin(start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true", json=GATED)).json()
        assert run["tenant"] == "local"
        [approval] = (await c.get("/v1/approvals")).json()["items"]
        r = await c.post(f"/v1/approvals/{approval['id']}/decision", json={"decision": "approve"})
        assert r.status_code == 200 and r.json()["decided_by"] == "local"
        assert (await c.get("/metrics")).status_code == 200
        # a key created while the server runs turns authentication on
        api.app.state.alpaca.auth.recheck_seconds = 0
        key, record = await create_api_key(api.store, "acme", "admin", name="late")
        assert record.key_hash == hash_key(key)
        await asyncio.sleep(0)
        assert (await c.get("/v1/runs")).status_code == 401
        ok = await c.get("/v1/runs", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["items"] == []

"""Workflows from a builder over HTTP: push, validate, version, pin, draw, roles, bad input."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator

import pytest

from tests.helpers import gated_workflow as gated
from tests.unit.toolkit_fixtures.server import LocalServer, Reply, Request, serve

from .conftest import ApiFactory
from .test_runs import wait_state

YAML = {"Content-Type": "application/yaml"}
KEYS = {"ann": ("acme", "builder"), "uma": ("acme", "user"), "sue": ("acme", "supervisor"),
        "root": ("acme", "admin"), "eve": ("evil", "builder")}


def triage(port: int) -> str:
    """An HTTP tool (to the local test server) and a catalog tool, driven by a script."""
    return textwrap.dedent(f"""
        version: 1
        name: triage
        description: Look a ticket up, score it, answer.
        tools:
          - name: ticket
            description: Read a ticket.
            http: {{url: "http://127.0.0.1:{port}/tickets/{{id}}"}}
            capabilities: [tickets:read]
          - python: "alpaca_engine.examples_builtin.quickstart_tools:calculate"
        agents:
          - name: triager
            model:
              provider: scripted
              script:
                - {{tool: ticket, args: {{id: 42}}}}
                - {{tool: calculate, args: {{expression: "3 * 7"}}}}
                - "ticket 42 scores 21"
            tools: [ticket, calculate]
            capabilities: [tickets:read, compute]
    """).lstrip("\n")


@pytest.fixture
def tickets(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """A ticket service on 127.0.0.1; the operator allows private targets for this test."""
    monkeypatch.setenv("ALPACA_REGISTRY_ALLOW_PRIVATE", "1")

    def ticket(request: Request) -> Reply:
        return Reply(200, json.dumps({"id": 42, "title": "login broken", "path": request.path}),
                     content_type="application/json")

    with serve({"/tickets/42": ticket}) as server:
        yield server


async def test_a_pushed_workflow_with_an_http_and_a_catalog_tool_runs_to_succeeded(
        start_api: ApiFactory, tickets: LocalServer) -> None:
    async with start_api(keys=KEYS) as api, api.client("ann") as c:
        pushed = await c.post("/v1/workflows", content=triage(tickets.port), headers=YAML)
        assert pushed.status_code == 201, pushed.text
        body = pushed.json()
        assert (body["name"], body["version"], body["ref"], body["author"], body["created"]) == (
            "triage", 1, "registry:triage@1", "ann", True)
        assert pushed.headers["location"] == "/v1/workflows/triage/versions/1"
        run = await c.post("/v1/runs?wait=true",
                           json={"workflow": "triage", "agent": "triager", "input": "ticket 42"})
        assert run.status_code == 201, run.text
        done = run.json()
        assert (done["state"], done["output"], done["workflow"]) == (
            "succeeded", "ticket 42 scores 21", "registry:triage@1")
        steps = (await c.get(f"/v1/runs/{done['id']}/steps")).json()["items"]
        tools = [(s["name"], s["status"]) for s in steps if s["kind"] == "tool"]
        assert tools == [("ticket", "completed"), ("calculate", "completed")]
        assert steps[1]["output"]["title"] == "login broken"
        assert tickets.hits("/tickets/42")  # the HTTP tool really called the service


async def test_a_run_waiting_on_v1_finishes_on_v1_after_v2_is_pushed(
        start_api: ApiFactory) -> None:
    async with start_api(keys=KEYS) as api, api.client("ann") as ann, \
            api.client("sue") as sue:
        assert (await ann.post("/v1/workflows", content=gated("v1 answered", "1 + 1"),
                               headers=YAML)).status_code == 201
        waiting = (await ann.post("/v1/runs?wait=true", json={
            "workflow": "pinned", "agent": "agent", "input": "go"})).json()
        assert (waiting["state"], waiting["workflow"]) == ("waiting", "registry:pinned@1")
        v2 = await ann.post("/v1/workflows", content=gated("v2 answered", "2 + 2"), headers=YAML)
        assert (v2.status_code, v2.json()["version"]) == (201, 2)
        [approval] = (await sue.get("/v1/approvals")).json()["items"]
        assert approval["arguments"] == {"expression": "1 + 1"}
        decided = await sue.post(f"/v1/approvals/{approval['id']}/decision",
                                 json={"decision": "approve"})
        assert decided.status_code == 200
        done = await wait_state(ann, waiting["id"], "succeeded", "failed", seconds=60)
        assert (done["state"], done["output"], done["workflow"]) == (
            "succeeded", "v1 answered", "registry:pinned@1")
        steps = (await ann.get(f"/v1/runs/{waiting['id']}/steps")).json()["items"]
        [call] = [s for s in steps if s["kind"] == "tool"]
        assert json.loads(call["input"]["arguments"]) == {"expression": "1 + 1"}  # v1's script
        latest = (await ann.post("/v1/runs?wait=true", json={
            "workflow": "pinned@2", "agent": "agent", "input": "go"})).json()
        assert latest["workflow"] == "registry:pinned@2"


async def test_versions_by_content_listing_and_reading(start_api: ApiFactory) -> None:
    text = gated("one", "1 + 1")
    async with start_api(keys=KEYS) as api, api.client("ann") as c:
        first = await c.post("/v1/workflows", content=text, headers=YAML)
        again = await c.post("/v1/workflows", content="# a comment\n" + text, headers=YAML)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["version"] == 1 and not again.json()["created"]
        as_json = await c.post("/v1/workflows", json={
            "version": 1, "name": "pinned",
            "agents": [{"name": "a", "model": {"provider": "scripted", "script": ["hi"]}}]})
        assert (as_json.status_code, as_json.json()["version"]) == (201, 2)
        listed = (await c.get("/v1/workflows")).json()["items"]
        assert [(w["name"], w["kind"], w["version"], w["read_only"]) for w in listed] == [
            ("pinned", "registered", 2, False),
            ("file:workflow", "served", None, True),
            ("builtin:quickstart", "served", None, True)]
        detail = (await c.get("/v1/workflows/pinned")).json()
        assert [v["version"] for v in detail["versions"]] == [2, 1]
        assert detail["agents"] == ["a"] and detail["versions"][0]["source"] is None
        v1 = (await c.get("/v1/workflows/pinned/versions/1")).json()
        assert v1["source"] == text and v1["format"] == "yaml"
        assert (await c.get("/v1/workflows/pinned/versions/2")).json()["format"] == "json"
        served = (await c.get("/v1/workflows/builtin:quickstart")).json()
        assert (served["kind"], served["agents"], served["versions"]) == (
            "served", ["researcher"], [])
        for missing in ("/v1/workflows/nope", "/v1/workflows/pinned/versions/3",
                        "/v1/workflows/builtin:nope", "/v1/workflows/builtin:quickstart/"
                        "versions/1"):
            r = await c.get(missing)
            assert r.status_code == 404, missing
            assert r.headers["content-type"] == "application/problem+json"


async def test_validate_answers_every_error_with_path_and_line_and_stores_nothing(
        start_api: ApiFactory) -> None:
    broken = textwrap.dedent("""
        version: 1
        name: broken
        tools:
          - python: "os:system"
          - mcp: {server: local, command: [sh, -c, "rm -rf /"]}
          - name: leak
            http: {url: "https://api.example.com/x",
                   headers: {Authorization: "Bearer abcdefghijklmnop"}}
        agents:
          - name: orchestrator
            model: {provider: scripted, script: [done]}
            tools: [system]
            delegates_to: [orchestrator, helper]
          - name: researcher
            model: {provider: scripted, script: [done]}
            tools: [nothing_here]
    """).lstrip("\n")
    async with start_api(keys=KEYS) as api, api.client("uma") as c:
        r = await c.post("/v1/workflows/validate", content=broken, headers=YAML)
        assert r.status_code == 200, r.text
        body = r.json()
        assert not body["valid"] and body["name"] == "broken"
        assert [(e["path"], e["line"]) for e in body["errors"]] == [
            ("tools[2].http.headers.Authorization", 8),
            ("tools[0].python", 4),
            ("tools[1].mcp.command", 5),
            ("agents[0].delegates_to[0]", 13),
            ("agents[0].delegates_to[1]", 13),
            ("agents[1].tools[0]", 16),
        ]
        assert "abcdefghijklmnop" not in r.text
        fine = await c.post("/v1/workflows/validate", content=gated("ok", "1"), headers=YAML)
        assert fine.json()["valid"] and fine.json()["agents"] == ["agent"]
        assert len(fine.json()["content_hash"]) == 64
        assert (await c.get("/v1/workflows")).json()["items"][0]["kind"] == "served"


async def test_a_cycle_in_the_drawing_is_a_warning_a_push_still_stores(
        start_api: ApiFactory) -> None:
    loop = textwrap.dedent("""
        version: 1
        name: loop
        agents:
          - name: a
            model: {provider: scripted, script: [done]}
            delegates_to: [b]
          - name: b
            model: {provider: scripted, script: [done]}
            delegates_to: [a]
    """).lstrip("\n")
    async with start_api(keys=KEYS) as api, api.client("ann") as c:
        checked = (await c.post("/v1/workflows/validate", content=loop, headers=YAML)).json()
        assert checked["valid"] and checked["errors"] == []
        [warning] = checked["warnings"]
        assert (warning["path"], warning["line"]) == ("agents[1].delegates_to[0]", 9)
        assert "delegation cycle a -> b -> a" in warning["message"]
        pushed = await c.post("/v1/workflows", content=loop, headers=YAML)
        assert pushed.status_code == 201 and pushed.json()["warnings"] == [warning]


@pytest.mark.parametrize(("document", "path", "message"), [
    ("version: 1\nname: ../../etc\nagents: [{name: a, model: {provider: scripted, "
     "script: [x]}}]\n", "name", "a name is 1-64 letters, digits, '_' or '-'"),
    ("version: 1\nname: x\ncolour: red\nagents: [{name: a, model: {provider: scripted, "
     "script: [x]}}]\n", "colour", "unknown field 'colour'"),
    ("version: 1\nagents: [{name: a, model: {provider: scripted, script: [x]}}]\n", "name",
     "required to register a workflow"),
    ("version: 1\nname: x\nagents: [{name: a, model: {provider: scripted, script: [x]}, "
     "delegates_to: [a]}]\n", "agents[0].delegates_to[0]", "cannot delegate to itself"),
    ("\n".join(["version: 1", "name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]",
                *[f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]]),
     "", "expands to more than 100000 values"),
    ("version: 1\nname: x\n  agents: [\n", "", "invalid YAML"),
    ("", "", "the workflow is empty"),
])
async def test_bad_documents_answer_422_with_the_path_and_store_nothing(
        start_api: ApiFactory, document: str, path: str, message: str) -> None:
    async with start_api(keys=KEYS) as api, api.client("ann") as c:
        r = await c.post("/v1/workflows", content=document, headers=YAML)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert problem["code"] == "invalid_workflow" and "nothing was stored" in problem["detail"]
        first = problem["errors"][0]
        assert path in first["path"] and message in first["message"], problem
        assert await api.store.list_workflows("acme") == []


async def test_bodies_that_are_not_workflows_are_refused_cleanly(start_api: ApiFactory) -> None:
    async with start_api(keys=KEYS, body_limit=4096) as api, api.client("ann") as c:
        big = await c.post("/v1/workflows", content="#" * 5000, headers=YAML)
        assert big.status_code == 413 and big.json()["code"] == "payload_too_large"
        form = await c.post("/v1/workflows", content="a=b",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415 and "application/yaml" in form.json()["detail"]
        binary = await c.post("/v1/workflows", content=b"\xff\xfe\x00", headers=YAML)
        assert binary.status_code == 400 and "UTF-8" in binary.json()["detail"]
        bad_name = await c.get("/v1/workflows/..%2F..%2Fetc")
        assert bad_name.status_code in (404, 422)
        assert bad_name.headers["content-type"] == "application/problem+json"
        assert await api.store.list_workflows("acme") == []


async def test_roles_and_tenants(start_api: ApiFactory) -> None:
    text = gated("x", "1")
    async with start_api(keys=KEYS) as api:
        async with api.client("uma") as uma, api.client("sue") as sue:
            for client in (uma, sue):
                refused = await client.post("/v1/workflows", content=text, headers=YAML)
                assert refused.status_code == 403 and "builder role" in refused.json()["detail"]
        async with api.client("root") as root:
            assert (await root.post("/v1/workflows", content=text,
                                    headers=YAML)).status_code == 201
        async with api.client("uma") as uma:  # a user may list, read, validate and run
            listed = (await uma.get("/v1/workflows")).json()["items"]
            assert listed[0]["name"] == "pinned"
            assert (await uma.get("/v1/workflows/pinned/graph")).status_code == 200
            run = await uma.post("/v1/runs?wait=true", json={
                "workflow": "pinned", "agent": "agent", "input": "go"})
            assert run.status_code == 201 and run.json()["state"] == "waiting"
        async with api.client("ann") as ann:  # a builder cannot decide approvals
            [approval] = (await ann.get("/v1/approvals")).json()["items"]
            denied = await ann.post(f"/v1/approvals/{approval['id']}/decision",
                                    json={"decision": "approve"})
            assert denied.status_code == 403
        async with api.client("eve") as eve:  # another tenant's workflow does not exist
            for path in ("/v1/workflows/pinned", "/v1/workflows/pinned/versions/1",
                         "/v1/workflows/pinned/graph", "/v1/workflows/pinned/versions/1/graph"):
                assert (await eve.get(path)).status_code == 404, path
            assert [w["kind"] for w in (await eve.get("/v1/workflows")).json()["items"]] == [
                "served", "served"]
            run = await eve.post("/v1/runs", json={"workflow": "pinned", "agent": "agent",
                                                   "input": "go"})
            assert run.status_code == 422 and run.json()["code"] == "unknown_workflow"
            mine = await eve.post("/v1/workflows", content=text, headers=YAML)
            assert (mine.status_code, mine.json()["version"]) == (201, 1)


async def test_the_graph_of_registered_and_served_workflows(start_api: ApiFactory) -> None:
    async with start_api(keys=KEYS, workflows=["builtin:demo", "builtin:quickstart"]) as api, \
            api.client("ann") as c:
        one = await c.post("/v1/workflows", content=gated("one", "1"), headers=YAML)
        two = await c.post("/v1/workflows", content=gated("two", "2").replace(
            "    approval: required\n", ""), headers=YAML)
        assert (one.status_code, two.status_code) == (201, 201), two.text
        latest = (await c.get("/v1/workflows/pinned/graph")).json()
        first = (await c.get("/v1/workflows/pinned/versions/1/graph")).json()
        assert (latest["workflow"], first["workflow"]) == (
            "registry:pinned@2", "registry:pinned@1")
        kinds = [(e["kind"], e["source"], e["target"]) for e in first["edges"]]
        assert kinds == [("uses", "agent:agent", "tool:calculate"),
                         ("gated", "agent:agent", "tool:calculate")]
        assert [e["kind"] for e in latest["edges"]] == ["uses"]
        demo = (await c.get("/v1/workflows/builtin:demo/graph")).json()
        assert demo["roots"] == ["agent:orchestrator", "agent:assistant"]
        assert {n["id"] for n in demo["nodes"]} >= {"agent:notification", "tool:notify_slack"}
        assert (await c.get("/v1/workflows/nope/graph")).status_code == 404
        tools = (await c.get("/v1/tools")).json()["items"]
        served = [t for t in tools if t["workflow"] == "builtin:demo"]
        assert {t["python"] for t in served} == {
            "alpaca_engine.toolkit:web_search", "alpaca_engine.toolkit:search_documents",
            "alpaca_engine.toolkit:fetch_page", "alpaca_engine.toolkit:notify_slack"}
        assert next(t for t in served if t["name"] == "notify_slack")["approval"] == "required"
        paths = [t["python"] for t in tools]
        assert len(paths) == len(set(paths))  # each catalog tool once, served ones first
        assert "alpaca_engine.examples_builtin.quickstart_tools:calculate" in paths


async def test_a_retry_with_the_same_idempotency_key_finds_its_run_after_a_new_version(
        start_api: ApiFactory) -> None:
    body = {"workflow": "pinned", "agent": "agent", "input": "go"}
    key = {"Idempotency-Key": "retry-1"}
    async with start_api(keys=KEYS, worker=False) as api, api.client("ann") as c:
        await c.post("/v1/workflows", content=gated("one", "1"), headers=YAML)
        first = await c.post("/v1/runs", json=body, headers=key)
        await c.post("/v1/workflows", content=gated("two", "2"), headers=YAML)
        again = await c.post("/v1/runs", json=body, headers=key)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["id"] == first.json()["id"]
        assert again.json()["workflow"] == "registry:pinned@1"
        other = await c.post("/v1/runs", json={**body, "workflow": "pinned@2"}, headers=key)
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"

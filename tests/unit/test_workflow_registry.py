"""The registry: push validates and versions, names resolve and pin, a run keeps its version."""

from __future__ import annotations

import pytest

from alpaca_engine.engine import Engine
from alpaca_engine.errors import NotFound
from alpaca_engine.lifecycle import RunState
from alpaca_engine.store.records import WorkflowRecord
from alpaca_engine.store.sqlite import SQLiteStore
from alpaca_engine.workflows.loader import WorkflowError, resolve_workflow
from alpaca_engine.workflows.policy import build_catalog
from alpaca_engine.workflows.registry import (
    WorkflowRegistry,
    WorkflowRejected,
    content_hash,
    parse_name,
    registry_ref,
)
from tests.helpers import gated_workflow

CATALOG = build_catalog([resolve_workflow("builtin:quickstart")])


def test_names_and_refs() -> None:
    assert parse_name("triage") == ("triage", None)
    assert parse_name("triage@12") == ("triage", 12)
    assert parse_name("registry:triage@3") == ("triage", 3)
    for other in ("registry:triage", "builtin:demo", "/srv/wf.yaml", "a/b", "x@0", "x@", ""):
        assert parse_name(other) is None, other
    assert registry_ref("triage", 3) == "registry:triage@3"
    assert content_hash({"b": 1, "a": [1, 2]}) == content_hash({"a": [1, 2], "b": 1})


async def test_push_versions_by_content_and_refuses_invalid_documents(
        store: SQLiteStore) -> None:
    registry = WorkflowRegistry(store, catalog=CATALOG, clock=lambda: 1000.0)
    first, created, _ = await registry.push("acme", gated_workflow("v1"), author="ann")
    assert (first.name, first.version, created, first.author) == ("pinned", 1, True, "ann")
    comment_only = "# the same workflow, commented\n" + gated_workflow("v1")
    same, created, _ = await registry.push("acme", comment_only, author="bob")
    assert (same.version, created, same.author) == (1, False, "ann")
    as_json = await registry.push("acme", '{"version": 1, "name": "pinned", "agents": '
                                  '[{"name": "a", "model": {"provider": "scripted", '
                                  '"script": ["hi"]}}]}', fmt="json")
    assert (as_json[0].version, as_json[0].format) == (2, "json")
    with pytest.raises(WorkflowRejected) as info:
        await registry.push("acme", "version: 1\nname: bad/name\nagents: []\n")
    assert [(e.field, e.line) for e in info.value.diagnosis.errors] == [
        ("name", 2), ("agents", 3)]
    assert await store.list_workflows("acme") == [as_json[0]]  # nothing else was stored


async def test_resolve_pins_the_version_and_caches_it(store: SQLiteStore) -> None:
    registry = WorkflowRegistry(store, catalog=CATALOG)
    await registry.push("acme", gated_workflow("v1"))
    await registry.push("acme", gated_workflow("v2"))
    latest = await registry.resolve("acme", "pinned")
    assert latest.ref == "registry:pinned@2"
    first = await registry.resolve("acme", "pinned@1")
    assert first.ref == "registry:pinned@1"
    assert await registry.resolve("acme", "registry:pinned@1") is first  # cached
    with pytest.raises(NotFound, match="version 3 of workflow 'pinned' not found"):
        await registry.resolve("acme", "pinned@3")
    with pytest.raises(NotFound):
        await registry.resolve("other-tenant", "pinned")
    with pytest.raises(NotFound, match="not a registered workflow's name"):
        await registry.resolve("acme", "../../etc/passwd")


async def test_a_run_waiting_on_v1_finishes_on_v1_after_v2_is_pushed(
        store: SQLiteStore) -> None:
    """The run records registry:pinned@1; a fresh engine (a restarted worker, empty cache)
    resumes it on v1 even though v2 is the latest by then."""
    pusher = WorkflowRegistry(store, catalog=CATALOG)
    await pusher.push("acme", gated_workflow("answered by v1"))
    engine = Engine(store, resolve_workflow)
    workflow = await engine.registry.resolve("acme", "pinned")
    run = await engine.run(workflow, "agent", "what is 6 * 7?", tenant="acme")
    assert (run.state, run.workflow) == (RunState.WAITING, "registry:pinned@1")
    await pusher.push("acme", gated_workflow("answered by v2"))
    [approval] = await store.list_approvals(tenant="acme")
    await store.decide_approval(approval.id, approve=True, by="sue", comment=None, now=1.0)
    restarted = Engine(store, resolve_workflow)
    done = await restarted.run_tree(run.id)
    assert (done.state, done.output) == (RunState.SUCCEEDED, "answered by v1")
    steps = await store.list_steps(run.id)
    assert [s.name for s in steps if s.kind == "tool"] == ["calculate"]


async def test_a_run_whose_workflow_no_longer_loads_fails_with_the_reason(
        store: SQLiteStore) -> None:
    engine = Engine(store, resolve_workflow)
    workflow = resolve_workflow("builtin:quickstart")
    run = await engine.submit(workflow, "researcher", "hi", tenant="acme")
    broken = run.model_copy(update={"workflow": "registry:gone@1"})
    claimed = await store.claim_run(run.id, "w", 30, 1.0)
    assert claimed is not None
    done = await engine.drive(broken.model_copy(update={"epoch": claimed.epoch}))
    assert (done.state, done.error_code) == (RunState.FAILED, "config_error")
    assert "workflow registry:gone@1 does not load" in (done.error_message or "")


async def test_an_unreachable_mcp_server_is_retried_later_not_failed(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPACA_REGISTRY_ALLOW_PRIVATE", "1")
    source = ("version: 1\nname: remote\ntools:\n  - mcp: {server: gone, url: "
              "'http://127.0.0.1:9/mcp', connect_timeout: 2}\nagents:\n  - name: a\n"
              "    model: {provider: scripted, script: [done]}\n")
    await store.put_workflow(WorkflowRecord(tenant="acme", name="remote", content_hash="h",
                                            source=source))
    engine = Engine(store, resolve_workflow)
    quickstart = resolve_workflow("builtin:quickstart")
    run = await engine.submit(quickstart, "researcher", "hi", tenant="acme")
    claimed = await store.claim_run(run.id, "w", 30, 1.0)
    assert claimed is not None
    pinned = claimed.model_copy(update={"workflow": "registry:remote@1"})
    with pytest.raises(WorkflowError) as info:
        await engine.drive(pinned)
    assert info.value.field == "tools[0].mcp.url"
    assert (await store.get_run(run.id)).state == RunState.RUNNING  # its lease will expire

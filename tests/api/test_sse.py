"""Run events over Server-Sent Events: every record once, in order, resumable, and finished.

The contract (README "Events", ``api/events.py``): every event is the default ``message``
event with JSON ``data`` told apart by ``type``; durable events carry the resume position as
``id``; ``end`` closes the stream; a position at or past the end of a finished stream is 204.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from alpaca_engine.api.events import INT64_MAX, format_cursor, parse_cursor
from alpaca_engine.api.problems import ProblemError
from tests.helpers import PATIENCE, alpaca_serve, postgres_database, redis_database

from .conftest import ApiFactory, parse_sse
from .test_runs import QS

DEMO = {"agent": "orchestrator", "input": "Should we launch?", "workflow": "builtin:demo"}


def records_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["data"]["record"] for e in events if e["data"]["type"] == "audit"]


async def test_every_record_is_a_message_event_then_end_and_a_finished_reconnect_is_204(
        start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true", json=QS)).json()
        audit = (await c.get(f"/v1/runs/{run['id']}/audit")).json()["items"]
        r = await c.get(f"/v1/runs/{run['id']}/events")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "\nevent:" not in "\n" + r.text  # the default `message` event, always
        events = parse_sse(r.text)
        *records, end = events
        assert [e["data"]["type"] for e in records] == ["audit"] * len(audit)
        assert [e["data"]["record"] for e in records] == audit
        assert {e["data"]["run_id"] for e in records} == {run["id"]}
        assert [e["id"] for e in records] == [str(a["seq"]) for a in audit]
        assert "id" not in end
        assert end["data"] == {"type": "end", "run_id": run["id"], "state": "succeeded",
                               "last_event_id": str(len(audit))}

        middle = len(audit) // 2
        resumed = parse_sse((await c.get(f"/v1/runs/{run['id']}/events",
                                         headers={"Last-Event-ID": str(middle)})).text)
        assert records_of(resumed) == audit[middle:]
        assert resumed[-1]["data"]["type"] == "end"
        # At or past the end of a finished run: nothing will ever come, say so with 204.
        for position in ({"headers": {"Last-Event-ID": str(len(audit))}},
                         {"headers": {"Last-Event-ID": str(len(audit) + 5)}},
                         {"params": {"after": len(audit)}}):
            done = await c.get(f"/v1/runs/{run['id']}/events", **position)  # type: ignore[arg-type]
            assert (done.status_code, done.content) == (204, b"")


@pytest.mark.parametrize(("position", "needle"), [
    ({"headers": {"Last-Event-ID": "x"}}, "Last-Event-ID must be a record seq"),
    ({"headers": {"Last-Event-ID": str(INT64_MAX + 1)}}, "Last-Event-ID must be a record seq"),
    ({"headers": {"Last-Event-ID": "-1"}}, "Last-Event-ID must be a record seq"),
    ({"params": {"after": str(INT64_MAX + 1)}}, "after"),
    ({"params": {"after": "3", "tree": "true"}}, "a tree stream resumes from Last-Event-ID"),
    ({"params": {"tree": "true"}, "headers": {"Last-Event-ID": "3,run_nope:2"}},
     "names run run_nope, which is not in this stream"),
    ({"params": {"tree": "true"}, "headers": {"Last-Event-ID": "3,:2"}}, "not a tree cursor"),
])
async def test_a_bad_position_is_a_422_problem_before_any_stream(
        start_api: ApiFactory, position: dict[str, Any], needle: str) -> None:
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true", json=QS)).json()
        r = await c.get(f"/v1/runs/{run['id']}/events", **position)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert needle in r.json()["detail"]


def test_tree_cursors_round_trip_and_name_children_by_their_path() -> None:
    base = "run_ab12"
    cursor = {base: 12, f"{base}.3": 7, f"{base}.3.5": 4, "run_elsewhere": 2}
    text = format_cursor(base, cursor)
    assert text == "12,.3:7,.3.5:4,run_elsewhere:2"
    assert parse_cursor(base, text) == cursor
    assert parse_cursor(base, ".3:1") == {f"{base}.3": 1}
    for bad in ("12,12", "x", ".3:", f".3:{INT64_MAX + 1}", "1,,2"):
        with pytest.raises(ProblemError):
            parse_cursor(base, bad)


async def test_a_tree_stream_carries_every_run_of_the_tree_and_resumes_by_cursor(
        start_api: ApiFactory) -> None:
    async with start_api(workflows=["builtin:demo"]) as api, api.client() as c:
        root = (await c.post("/v1/runs?wait=true", json=DEMO)).json()
        assert root["state"] == "waiting"  # the notification child waits for its approval
        [approval] = (await c.get("/v1/approvals")).json()["items"]
        assert approval["run_id"] != root["id"]
        assert (await c.post(f"/v1/approvals/{approval['id']}/decision",
                             json={"decision": "approve"})).status_code == 200
        for _ in range(600):
            if (await c.get(f"/v1/runs/{root['id']}")).json()["state"] == "succeeded":
                break
            await asyncio.sleep(0.05)
        live = parse_sse((await c.get(f"/v1/runs/{root['id']}/events?tree=true")).text)
        requested = [e for e in live if e["data"]["type"] == "audit"
                     and e["data"]["record"]["kind"] == "approval.requested"]
        assert [e["data"]["run_id"] for e in requested] == [approval["run_id"]]

        tree = (await c.get("/v1/runs", params={"root_id": root["id"]})).json()["items"]
        assert len(tree) == 5
        audits = {r["id"]: (await c.get(f"/v1/runs/{r['id']}/audit")).json()["items"]
                  for r in tree}
        *records, end = live
        for run_id, audit in audits.items():  # each run's records, in order, exactly once
            assert [e["data"]["record"] for e in records if e["data"]["run_id"] == run_id] \
                == audit
        assert end["data"]["type"] == "end" and end["data"]["state"] == "succeeded"
        assert end["data"]["last_event_id"] == records[-1]["id"]
        assert parse_cursor(root["id"], records[-1]["id"]) == {
            run_id: len(audit) for run_id, audit in audits.items()}

        # Reconnecting from any event's id sends exactly what came after it.
        middle = len(records) // 2
        resumed = parse_sse((await c.get(f"/v1/runs/{root['id']}/events?tree=true", headers={
            "Last-Event-ID": records[middle]["id"]})).text)
        assert [(e["data"]["run_id"], e["data"]["record"]["seq"]) for e in resumed[:-1]] == [
            (e["data"]["run_id"], e["data"]["record"]["seq"]) for e in records[middle + 1:]]
        done = await c.get(f"/v1/runs/{root['id']}/events?tree=true",
                           headers={"Last-Event-ID": end["data"]["last_event_id"]})
        assert done.status_code == 204


async def _read(client: httpx.AsyncClient, url: str, out: list[dict[str, Any]],
                headers: dict[str, str] | None = None) -> bool:
    """Read a live stream event by event until the server closes it; True if it sent 200."""
    async with client.stream("GET", url, headers=headers or {}) as r:
        if r.status_code == 204:
            return False
        assert r.status_code == 200, await r.aread()
        block: list[str] = []
        async for line in r.aiter_lines():
            if line:
                block.append(line)
                continue
            out.extend(parse_sse("\n".join(block) + "\n\n"))
            block = []
    return True


# ---------------------------------------------------------------- a real `alpaca serve`

COMBINATIONS = ["sqlite+local", "postgres+redis", "sqlite+redis"]


@contextmanager
def serve_on(combination: str, tmp_path: Path, workflow: Path) -> Iterator[str]:
    """`alpaca serve` of ``workflow`` on a ``store+coordination`` combination (a fresh
    PostgreSQL database, an unused Redis database); yields its base URL."""
    store, coordination = combination.split("+")
    with ExitStack() as stack:
        env = {**os.environ, "ALPACA_POLL_INTERVAL": "0.05"}
        env.pop("ALPACA_REDIS_URL", None)
        env["ALPACA_DATABASE_URL"] = (stack.enter_context(postgres_database())
                                      if store == "postgres" else f"sqlite:///{tmp_path}/s.db")
        if coordination == "redis":
            env["ALPACA_REDIS_URL"] = stack.enter_context(redis_database())
        yield stack.enter_context(alpaca_serve(env, "--workflow", str(workflow)))


@pytest.fixture(params=COMBINATIONS)
def server(request: pytest.FixtureRequest, tmp_path: Path, gated_workflow: Path) -> Iterator[str]:
    """`alpaca serve` of the gated workflow on each store/coordination combination."""
    with serve_on(request.param, tmp_path, gated_workflow) as base:
        yield base


@pytest.mark.e2e
@pytest.mark.timeout(900)
async def test_every_stream_closes_after_end_on_every_store_and_coordination(
        server: str) -> None:
    """Live until the end, then every reconnect to the finished run also closes (on
    PostgreSQL + Redis a cancelled Redis subscriber used to hold such streams open)."""
    async with httpx.AsyncClient(base_url=server, timeout=httpx.Timeout(PATIENCE)) as c:
        run = (await c.post("/v1/runs", json={"agent": "announcer", "input": "go"})).json()
        events: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read(c, f"/v1/runs/{run['id']}/events", events))
        deadline = time.monotonic() + PATIENCE
        while not any(r["kind"] == "approval.requested" for r in records_of(events)):
            # the run pauses for the approval while we listen
            assert time.monotonic() < deadline, f"no approval.requested event: {events}"
            await asyncio.sleep(0.05)
        assert not reader.done()
        [approval] = (await c.get("/v1/approvals")).json()["items"]
        r = await c.post(f"/v1/approvals/{approval['id']}/decision", json={"decision": "approve"})
        assert r.status_code == 200
        assert await asyncio.wait_for(reader, PATIENCE)

        *records, end = events
        assert end["data"]["type"] == "end" and end["data"]["state"] == "succeeded"
        seqs = [e["data"]["record"]["seq"] for e in records]
        assert seqs == list(range(1, len(seqs) + 1))  # consecutive: no gap, no duplicate
        assert [e["id"] for e in records] == [str(s) for s in seqs]

        # Reconnects to the finished run, as EventSource clients do: each one ends.
        for attempt in range(12):
            position = attempt % len(seqs)
            headers = {"Last-Event-ID": str(position)} if position else {}
            again: list[dict[str, Any]] = []
            # The server pings every 15 s, so a stream held open never times out by itself.
            try:
                sent = await asyncio.wait_for(
                    _read(c, f"/v1/runs/{run['id']}/events", again, headers), 60)
            except TimeoutError:
                raise AssertionError(f"reconnect {attempt} (Last-Event-ID {position}) got "
                                     f"{len(again)} events and was then held open") from None
            assert sent and [e["data"]["record"]["seq"] for e in again[:-1]] == \
                seqs[position:]
            assert again[-1]["data"]["type"] == "end"
        assert not await _read(c, f"/v1/runs/{run['id']}/events", [],
                               {"Last-Event-ID": str(seqs[-1])})  # 204

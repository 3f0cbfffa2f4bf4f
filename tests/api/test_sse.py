"""Run events over Server-Sent Events: every audit record once, in order, resumable."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import PATIENCE, alpaca_serve

from .conftest import ApiFactory, parse_sse
from .test_runs import QS


async def test_events_of_a_finished_run_then_resume_without_gaps_or_duplicates(
        start_api: ApiFactory) -> None:
    async with start_api() as api, api.client() as c:
        run = (await c.post("/v1/runs?wait=true", json=QS)).json()
        audit = (await c.get(f"/v1/runs/{run['id']}/audit")).json()["items"]
        r = await c.get(f"/v1/runs/{run['id']}/events")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        *records, end = events
        assert [int(e["id"]) for e in records] == [a["seq"] for a in audit]
        assert [int(e["id"]) for e in records] == list(range(1, len(audit) + 1))
        assert [e["event"] for e in records] == [a["kind"] for a in audit]
        assert records[0]["data"] == audit[0]
        assert end["event"] == "end" and "id" not in end
        assert end["data"] == {"run_id": run["id"], "state": "succeeded",
                               "last_seq": len(audit)}

        middle = len(audit) // 2
        resumed = parse_sse((await c.get(f"/v1/runs/{run['id']}/events",
                                         headers={"Last-Event-ID": str(middle)})).text)
        assert [int(e["id"]) for e in resumed[:-1]] == list(range(middle + 1, len(audit) + 1))
        assert resumed[-1]["event"] == "end"
        by_query = parse_sse((await c.get(f"/v1/runs/{run['id']}/events",
                                          params={"after": len(audit)})).text)
        assert [e["event"] for e in by_query] == ["end"]
        bad = await c.get(f"/v1/runs/{run['id']}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422


# ---------------------------------------------------------------- a real `alpaca serve`


@pytest.fixture
def server(tmp_path: Path, gated_workflow: Path) -> Iterator[str]:
    env = {**os.environ, "ALPACA_DATABASE_URL": f"sqlite:///{tmp_path}/serve.db",
           "ALPACA_POLL_INTERVAL": "0.05"}
    with alpaca_serve(env, "--workflow", str(gated_workflow)) as base:
        yield base


async def collect(client: httpx.AsyncClient, url: str, out: list[dict[str, Any]],
                  headers: dict[str, str] | None = None) -> None:
    """Read a live stream event by event (a blank line ends one) until ``end``."""
    async with client.stream("GET", url, headers=headers or {}) as r:
        assert r.status_code == 200
        block: list[str] = []
        async for line in r.aiter_lines():
            if line:
                block.append(line)
                continue
            out.extend(parse_sse("\n".join(block) + "\n\n"))
            block = []
            if out and out[-1].get("event") == "end":
                return


@pytest.mark.e2e
async def test_live_stream_from_a_real_server_follows_the_run_to_its_end(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=PATIENCE) as c:
        run = (await c.post("/v1/runs", json={"agent": "announcer", "input": "go"})).json()
        events: list[dict[str, Any]] = []
        reader = asyncio.create_task(collect(c, f"/v1/runs/{run['id']}/events", events))
        deadline = time.monotonic() + PATIENCE
        while not any(e.get("event") == "approval.requested" for e in events):
            # the run pauses for the approval while we listen
            assert time.monotonic() < deadline, f"no approval.requested event: {events}"
            await asyncio.sleep(0.05)
        assert not reader.done()
        [approval] = (await c.get("/v1/approvals")).json()["items"]
        r = await c.post(f"/v1/approvals/{approval['id']}/decision",
                         json={"decision": "approve"})
        assert r.status_code == 200
        await asyncio.wait_for(reader, PATIENCE)

        *records, end = events
        seqs = [int(e["id"]) for e in records]
        assert seqs == list(range(1, len(seqs) + 1))  # consecutive: no gap, no duplicate
        assert end["event"] == "end" and end["data"]["state"] == "succeeded"
        kinds = [e["event"] for e in records]
        assert "approval.decided" in kinds and kinds[0] == "run.created"
        audit = (await c.get(f"/v1/runs/{run['id']}/audit")).json()["items"]
        assert [a["seq"] for a in audit] == seqs

        resumed: list[dict[str, Any]] = []
        await collect(c, f"/v1/runs/{run['id']}/events", resumed,
                      headers={"Last-Event-ID": str(seqs[2])})
        assert [int(e["id"]) for e in resumed[:-1]] == seqs[3:]

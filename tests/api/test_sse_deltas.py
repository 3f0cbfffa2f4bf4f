"""``message.delta`` on the run event stream (DESIGN §10, README "Events").

Deltas come straight from the event bus (in-process, or Redis across processes) as SSE
``message`` events **without an id**, in order, before the durable record that completes
their model step; the durable records keep their ids, order and resumption; a reconnect
with ``Last-Event-ID`` gets no old delta (they are never replayed). A typed run's output is
JSON in the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import PATIENCE

from .conftest import ApiFactory, parse_sse, workflow_folder
from .test_sse import _read, serve_on

ANSWER = "The launch is announced: everyone knows it is at noon today, see you there."
WORKFLOW = f"""
version: 1
tools:
  - python: "api_gated_tools:announce"
    approval: required
agents:
  - name: streamer
    model:
      provider: scripted
      stream: true
      chunk_size: 6
      delay: 0.05
      script:
        - {{tool: announce, args: {{message: "launch at noon"}}}}
        - "{ANSWER}"
    tools: [announce]
    capabilities: [announce]
  - name: lead
    model:
      provider: scripted
      script: [{{tool: delegate_to_typed, args: {{task: decide}}}}, "done"]
    delegates_to: [typed]
    approval: {{delegations: [typed]}}
  - name: typed
    output_schema:
      type: object
      required: [decision]
      properties: {{decision: {{type: string}}}}
    model:
      provider: scripted
      stream: true
      chunk_size: 4
      delay: 0.05
      script: ['{{"decision": "GO", "why": "all is ready for the launch"}}']
"""


@pytest.fixture
def streaming_workflow(tmp_path: Path) -> Path:
    return workflow_folder(tmp_path / "swf", WORKFLOW)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    """``delta`` or the audit kind or ``end``, in the order the stream sent them."""
    out = []
    for e in events:
        data = e["data"]
        out.append("delta" if data["type"] == "message.delta" else
                   data["record"]["kind"] if data["type"] == "audit" else data["type"])
    return out


def check_deltas(events: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    """The stream's deltas, checked against the contract; returns them."""
    deltas = [e for e in events if e["data"]["type"] == "message.delta"]
    assert deltas, f"no delta reached the stream: {kinds(events)}"
    assert all("id" not in e for e in deltas)  # ephemeral: never a resume position
    outputs = {e["data"]["record"]["data"]["step"]: i for i, e in enumerate(events)
               if e["data"]["type"] == "audit" and e["data"]["run_id"] == run_id
               and e["data"]["record"]["kind"] == "model.output"}
    for step in {d["data"]["step"] for d in deltas if d["data"]["run_id"] == run_id}:
        mine = [d for d in deltas if d["data"]["run_id"] == run_id
                and d["data"]["step"] == step]
        indexes = [d["data"]["index"] for d in mine]
        assert indexes == sorted(set(indexes))  # in order, no duplicate
        assert events.index(mine[-1]) < outputs[step]  # before the completed turn
    assert events[-1]["data"]["type"] == "end"
    return [d["data"] for d in deltas]


async def approve_when_pending(c: httpx.AsyncClient, root_id: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while True:
        pending = [a for a in (await c.get("/v1/approvals")).json()["items"]
                   if a["root_id"] == root_id and a["status"] == "pending"]
        if pending:
            break
        assert time.monotonic() < deadline, "the run never asked for its approval"
        await asyncio.sleep(0.05)
    r = await c.post(f"/v1/approvals/{pending[0]['id']}/decision", json={"decision": "approve"})
    assert r.status_code == 200, r.text


async def test_deltas_reach_the_stream_in_process_before_their_record(
        start_api: ApiFactory, streaming_workflow: Path) -> None:
    async with start_api(workflows=[str(streaming_workflow)]) as api, api.client() as c:
        run = (await c.post("/v1/runs", json={"agent": "streamer", "input": "go"})).json()
        await approve_when_pending_after_listening(c, run["id"], events := [])
        deltas = check_deltas(events, run["id"])
        answer = [d for d in deltas if d["step"] == 3]
        assert answer and "".join(d["text"] for d in answer) in ANSWER
        assert ANSWER.endswith("".join(d["text"] for d in answer))  # only a head can be missed
        records = [e for e in events if e["data"]["type"] == "audit"]
        assert [int(e["id"]) for e in records] == list(range(1, len(records) + 1))
        final = (await c.get(f"/v1/runs/{run['id']}")).json()
        assert final["output"] == ANSWER and final["output_type"] == "text"


async def approve_when_pending_after_listening(
        c: httpx.AsyncClient, run_id: str, events: list[dict[str, Any]],
        path: str = "") -> None:
    """Open the stream (``path`` appended), approve the pending action once it is open,
    and read the stream to its end into ``events``."""
    reader = asyncio.create_task(_read(c, f"/v1/runs/{run_id}/events{path}", events))
    await asyncio.sleep(0.5)  # the stream subscribes to the bus meanwhile
    await approve_when_pending(c, run_id.split(".")[0])
    assert await asyncio.wait_for(reader, PATIENCE)


async def test_a_typed_run_is_json_in_the_api_and_its_deltas_reach_the_tree_stream(
        start_api: ApiFactory, streaming_workflow: Path) -> None:
    async with start_api(workflows=[str(streaming_workflow)]) as api, api.client() as c:
        agents = (await c.get("/v1/agents")).json()["items"]
        [typed] = [a for a in agents if a["name"] == "typed"]
        assert typed["output_schema"]["required"] == ["decision"]
        run = (await c.post("/v1/runs", json={"agent": "lead", "input": "go"})).json()
        events: list[dict[str, Any]] = []
        await approve_when_pending_after_listening(c, run["id"], events, "?tree=true")
        child = f"{run['id']}.2"  # the delegation is step 2
        deltas = check_deltas(events, child)
        assert {d["run_id"] for d in deltas} == {child}
        got = (await c.get(f"/v1/runs/{child}")).json()
        assert got["output_type"] == "json"
        assert got["output"] == {"decision": "GO", "why": "all is ready for the launch"}
        steps = (await c.get(f"/v1/runs/{run['id']}/steps")).json()["items"]
        [delegation] = [s for s in steps if s["kind"] == "delegation"]
        assert delegation["output"]["output"]["decision"] == "GO"  # the parent got JSON


# ---------------------------------------------------------------- a real `alpaca serve`


@pytest.fixture(params=["sqlite+local", "postgres+redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path,
           streaming_workflow: Path) -> Iterator[str]:
    with serve_on(request.param, tmp_path, streaming_workflow) as base:
        yield base


@pytest.mark.e2e
@pytest.mark.timeout(900)
async def test_a_real_server_streams_deltas_live_and_never_replays_them(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=httpx.Timeout(PATIENCE)) as c:
        run = (await c.post("/v1/runs", json={"agent": "streamer", "input": "go"})).json()
        events: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read(c, f"/v1/runs/{run['id']}/events", events))
        deadline = time.monotonic() + PATIENCE
        while "approval.requested" not in kinds(events):  # the stream is open and live
            assert time.monotonic() < deadline, f"no approval.requested: {kinds(events)}"
            await asyncio.sleep(0.05)
        await approve_when_pending(c, run["id"])
        saw_delta_while_running = False
        while not reader.done():
            if "delta" in kinds(events) and "end" not in kinds(events):
                saw_delta_while_running = True
            await asyncio.sleep(0.01)
        assert await reader
        assert saw_delta_while_running  # live: a delta came before the run's end
        deltas = check_deltas(events, run["id"])
        assert ANSWER.endswith("".join(d["text"] for d in deltas if d["step"] == 3))
        records = [e for e in events if e["data"]["type"] == "audit"]
        seqs = [e["data"]["record"]["seq"] for e in records]
        assert seqs == list(range(1, len(seqs) + 1))  # deltas broke no durable order

        # A reconnect (as EventSource does, with the last id it saw) gets records only.
        middle = seqs[len(seqs) // 2]
        again: list[dict[str, Any]] = []
        assert await _read(c, f"/v1/runs/{run['id']}/events", again,
                           {"Last-Event-ID": str(middle)})
        assert "delta" not in kinds(again)
        assert [e["data"]["record"]["seq"] for e in again[:-1]] == seqs[middle:]
        assert not await _read(c, f"/v1/runs/{run['id']}/events", [],
                               {"Last-Event-ID": str(seqs[-1])})  # 204 as before


def test_parse_helpers_see_no_id_on_a_delta() -> None:
    text = ('data: {"type":"message.delta","run_id":"r","step":1,"attempt":1,"index":0,'
            '"text":"hi"}\n\nid: 3\ndata: {"type":"end"}\n\n')
    first, second = parse_sse(text)
    assert "id" not in first and second["id"] == "3"

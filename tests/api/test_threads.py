"""``/v1/threads`` (DESIGN §10) through the real app: turns with memory, 409 for a second
message during a turn (also under concurrent posters), Idempotency-Key, bad input, fork,
delete with a verifiable audit, the thread event stream, and 404 for another tenant's thread
on every endpoint."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from alpaca_engine.api import create_app
from alpaca_engine.api.events import format_thread_cursor, parse_thread_cursor
from alpaca_engine.api.models import MAX_INPUT_CHARS
from alpaca_engine.api.problems import ProblemError
from alpaca_engine.config import Settings
from alpaca_engine.store.postgres import PostgresStore
from tests.helpers import PATIENCE, free_port
from tests.pg import PG_URL, pg_schema

from .conftest import ApiFactory
from .test_problems import assert_problem
from .test_sse import _read

CHAT_PY = '''
"""A function model that answers with every user message it was sent (its memory)."""

from alpaca_engine.tools.decorator import tool


@tool
def note(fact: str) -> str:
    """Note a fact."""
    return f"noted {fact}"


def memo(messages, tools):
    last = messages[-1]
    if last.role == "user" and last.content.startswith("note "):
        return {"tool": "note", "args": {"fact": last.content[5:]}}
    heard = [m.content for m in messages if m.role == "user"]
    return "heard: " + " | ".join(heard)
'''

CHAT_YAML = """
version: 1
tools:
  - python: "chat_model:note"
agents:
  - name: memo
    instructions: Remember what you are told.
    model: {provider: function, function: "chat_model:memo"}
    tools: [note]
  - name: streamer
    instructions: Remember what you are told, and say it piece by piece.
    model: {provider: function, function: "chat_model:memo", stream: true, chunk_size: 3,
            delay: 0.01}
    tools: [note]
"""

KEYS = {"ann": ("acme", "user"), "bob": ("globex", "user")}


@pytest.fixture
def chat_workflow(tmp_path: Path) -> Path:
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "chat_model.py").write_text(textwrap.dedent(CHAT_PY))
    (folder / "workflow.yaml").write_text(CHAT_YAML)
    return folder / "workflow.yaml"


async def a_thread(c: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await c.post("/v1/threads", json={"agent": "memo", **body})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/v1/threads/{r.json()['id']}"
    thread: dict[str, Any] = r.json()
    return thread


async def say(c: httpx.AsyncClient, thread_id: str, content: str, **kw: Any) -> dict[str, Any]:
    r = await c.post(f"/v1/threads/{thread_id}/messages?wait=true", json={"content": content},
                     **kw)
    assert r.status_code in (200, 201), r.text
    run: dict[str, Any] = r.json()
    return run


async def test_turns_remember_the_earlier_ones_and_list_in_order(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)]) as api, api.client() as c:
        thread = await a_thread(c, title="Ada", metadata={"channel": "web"})
        assert (thread["title"], thread["metadata"], thread["workflow_version"]) == (
            "Ada", {"channel": "web"}, None)
        assert thread["workflow"].endswith("chat/workflow.yaml")
        first = await say(c, thread["id"], "note my name is Ada")
        assert (first["state"], first["thread_id"], first["turn"]) == (
            "succeeded", thread["id"], 1)
        second = await say(c, thread["id"], "what is my name?")
        assert second["turn"] == 2
        assert second["output"] == "heard: note my name is Ada | what is my name?"
        listed = (await c.get(f"/v1/threads/{thread['id']}/messages")).json()["items"]
        assert [(m["turn"], m["run_id"], m["state"], m["content"], m["answer"])
                for m in listed] == [
            (1, first["id"], "succeeded", "note my name is Ada", first["output"]),
            (2, second["id"], "succeeded", "what is my name?", second["output"])]
        steps = (await c.get(f"/v1/runs/{second['id']}/steps")).json()["items"]
        assert [s["kind"] for s in steps] == ["model"]  # turn 1's tool did not run again
        shown = (await c.get(f"/v1/threads/{thread['id']}")).json()
        assert shown["updated_at"] >= second["created_at"]
        assert [t["id"] for t in (await c.get("/v1/threads")).json()["items"]] == [thread["id"]]


async def test_a_second_message_during_a_turn_is_409_even_from_concurrent_posters(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        thread = await a_thread(c)
        url = f"/v1/threads/{thread['id']}/messages"
        answers = await asyncio.gather(*(c.post(url, json={"content": f"m{n}"})
                                         for n in range(6)))
        created = [r for r in answers if r.status_code == 201]
        assert len(created) == 1, [r.text for r in answers]
        turn = created[0].json()
        assert turn["turn"] == 1 and turn["state"] == "queued"
        for refused in (r for r in answers if r is not created[0]):
            body = assert_problem(refused, 409, "turn_in_progress")
            assert body["run_id"] == turn["id"] and body["turn"] == 1
            assert turn["id"] in body["detail"]
        assert len((await c.get(url)).json()["items"]) == 1


async def test_idempotency_key_replays_the_turn_and_refuses_another_body(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        thread = await a_thread(c)
        other = await a_thread(c)
        url = f"/v1/threads/{thread['id']}/messages"
        key = {"Idempotency-Key": "msg-1"}
        first = await c.post(url, json={"content": "hi"}, headers=key)
        again = await c.post(url, json={"content": "hi"}, headers=key)  # the turn is queued
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Location"] == f"/v1/runs/{first.json()['id']}"
        assert_problem(await c.post(url, json={"content": "bye"}, headers=key), 409,
                       "idempotency_key_reused")
        assert_problem(await c.post(f"/v1/threads/{other['id']}/messages",
                                    json={"content": "hi"}, headers=key), 409,
                       "idempotency_key_reused")


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"content": ""}, "validation_error", "content"),
    ({"content": "  \n\t"}, "validation_error", "the message is empty"),
    ({"content": "x" * (MAX_INPUT_CHARS + 1)}, "validation_error", "content"),
    ({"content": "hi", "extra": 1}, "validation_error", "extra"),
    ({"content": "hi", "budget": {"max_steps": "3"}}, "validation_error", "max_steps"),
    ({}, "validation_error", "content"),
])
async def test_a_bad_message_is_422(start_api: ApiFactory, chat_workflow: Path,
                                    body: dict[str, Any], code: str, needle: str) -> None:
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        thread = await a_thread(c)
        r = await c.post(f"/v1/threads/{thread['id']}/messages", json=body)
        assert needle in assert_problem(r, 422, code)["detail"]
        assert (await c.get(f"/v1/threads/{thread['id']}/messages")).json()["items"] == []


async def test_unstorable_text_and_bad_threads_are_422(start_api: ApiFactory,
                                                       chat_workflow: Path) -> None:
    json_headers = {"content-type": "application/json"}
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        thread = await a_thread(c)
        url = f"/v1/threads/{thread['id']}/messages"
        assert_problem(await c.post(url, content=b'{"content": "a\\ud800"}',
                                    headers=json_headers), 422, "invalid_unicode")
        assert_problem(await c.post(url, content=b'{"content": "a\\u0000"}',
                                    headers=json_headers), 422, "nul_character")
        assert_problem(await c.post("/v1/threads", json={"agent": "nobody"}), 422,
                       "unknown_agent")
        assert_problem(await c.post("/v1/threads", json={"agent": "memo",
                                                         "workflow": "nope"}), 422,
                       "unknown_workflow")
        big = {"agent": "memo", "metadata": {"k": "x" * 20_000}}
        assert "metadata is" in assert_problem(await c.post("/v1/threads", json=big), 422,
                                               "validation_error")["detail"]
        assert_problem(await c.post("/v1/threads", content=b'{"agent": "memo", "title": '
                                    b'"\\u0000"}', headers=json_headers), 422, "nul_character")
        assert_problem(await c.post("/v1/threads", json={"agent": "memo",
                                                         "budget": {"deadline_seconds": 5}}),
                       422, "validation_error")


async def test_fork_shares_turns_and_refuses_past_the_last(start_api: ApiFactory,
                                                           chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)]) as api, api.client() as c:
        thread = await a_thread(c, title="t")
        one = await say(c, thread["id"], "note one")
        await say(c, thread["id"], "two")
        url = f"/v1/threads/{thread['id']}/fork"
        assert "has 2 turn(s)" in assert_problem(await c.post(url, json={"turn": 3}), 422,
                                                 "turn_out_of_range")["detail"]
        assert_problem(await c.post(url, json={"turn": -1}), 422, "validation_error")
        r = await c.post(url, json={"turn": 1})
        assert r.status_code == 201, r.text
        fork = r.json()
        assert (fork["forked_from"], fork["forked_turn"], fork["title"]) == (thread["id"], 1, "t")
        assert r.headers["Location"] == f"/v1/threads/{fork['id']}"
        [shared] = (await c.get(f"/v1/threads/{fork['id']}/messages")).json()["items"]
        assert (shared["content"], shared["answer"]) == ("note one", one["output"])
        assert shared["run_id"] != one["id"]
        other = await say(c, fork["id"], "another two")
        assert other["output"] == "heard: note one | another two" and other["turn"] == 2
        verified = (await c.get(f"/v1/runs/{shared['run_id']}/audit/verify")).json()
        assert verified["ok"] and verified["deleted_with"] is None
        empty = (await c.post(url, json={"turn": 0})).json()
        assert (await c.get(f"/v1/threads/{empty['id']}/messages")).json()["items"] == []


async def test_delete_erases_the_thread_and_its_runs_verify_as_deleted_anchored(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)]) as api, api.client() as c:
        thread = await a_thread(c, title="secret")
        run = await say(c, thread["id"], "note the password is swordfish")
        fork = (await c.post(f"/v1/threads/{thread['id']}/fork", json={"turn": 1})).json()
        r = await c.delete(f"/v1/threads/{thread['id']}")
        assert r.status_code == 200, r.text
        gone = r.json()
        assert gone["id"] == thread["id"] and gone["erased_runs"] == 1
        for url in (f"/v1/threads/{thread['id']}", f"/v1/threads/{thread['id']}/messages"):
            assert_problem(await c.get(url), 404, "not_found")
        assert_problem(await c.post(f"/v1/threads/{thread['id']}/messages",
                                    json={"content": "hi"}), 404, "not_found")
        assert_problem(await c.delete(f"/v1/threads/{thread['id']}"), 404, "not_found")
        erased = (await c.get(f"/v1/runs/{run['id']}")).json()
        assert (erased["input"], erased["output"]) == ("", None)
        assert (await c.get(f"/v1/runs/{run['id']}/steps")).json()["items"] == []
        assert (await c.get(f"/v1/runs/{run['id']}/audit")).json()["items"] == []
        verified = (await c.get(f"/v1/runs/{run['id']}/audit/verify")).json()
        assert verified["ok"] and verified["deleted_with"] == thread["id"]
        assert verified["anchor_seq"] == gone["anchor_seq"]
        swordfish = [m for m in (await c.get(f"/v1/threads/{fork['id']}/messages")).json()
                     ["items"]]
        assert "swordfish" in swordfish[0]["content"]  # the fork keeps its own copy
        assert [t["id"] for t in (await c.get("/v1/threads")).json()["items"]] == [fork["id"]]


async def test_delete_waits_for_the_turn_to_finish(start_api: ApiFactory,
                                                   chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        thread = await a_thread(c)
        run = (await c.post(f"/v1/threads/{thread['id']}/messages",
                            json={"content": "hi"})).json()
        assert assert_problem(await c.delete(f"/v1/threads/{thread['id']}"), 409,
                              "turn_in_progress")["run_id"] == run["id"]
        assert (await c.post(f"/v1/runs/{run['id']}/cancel")).status_code == 200
        assert (await c.delete(f"/v1/threads/{thread['id']}")).status_code == 200


async def test_another_tenants_thread_is_404_on_every_endpoint(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(keys=KEYS, workflows=[str(chat_workflow)]) as api, \
            api.client("ann") as ann, api.client("bob") as bob:
        thread = await a_thread(ann)
        await say(ann, thread["id"], "hello")
        base = f"/v1/threads/{thread['id']}"
        for method, url, body in (
                ("GET", base, None), ("DELETE", base, None),
                ("POST", f"{base}/messages", {"content": "hi"}),
                ("GET", f"{base}/messages", None), ("GET", f"{base}/events", None),
                ("POST", f"{base}/fork", {"turn": 1})):
            r = await bob.request(method, url, json=body)
            assert_problem(r, 404, "not_found")
            assert thread["id"] in r.json()["detail"]
        assert (await bob.get("/v1/threads")).json()["items"] == []
        assert (await ann.get(base)).status_code == 200  # untouched
        assert len((await ann.get(f"{base}/messages")).json()["items"]) == 1
        assert_problem(await ann.get("/v1/threads/thr_nope%00x"), 404, "not_found")


# ------------------------------------------------------------------------- the event stream


@asynccontextmanager
async def over_tcp(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app (its lifespan already running) served by uvicorn on this event loop: an
    open-ended stream needs a real connection (httpx's ASGI transport buffers a response
    until it ends)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning", timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + PATIENCE
    while not server.started:
        assert not task.done() and time.monotonic() < deadline, "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     timeout=httpx.Timeout(PATIENCE)) as client:
            yield client
    finally:
        server.should_exit = True
        await task


def test_thread_cursors_round_trip_and_refuse_what_is_not_one() -> None:
    assert format_thread_cursor({2: 3, 1: 14}) == "1:14,2:3"
    assert parse_thread_cursor("1:14,2:3", 2) == {1: 14, 2: 3}
    for bad in ("x", "1:2,1:3", "0:1", "3:1", "1:", ":4", "1:2,,2:1"):
        with pytest.raises(ProblemError):
            parse_thread_cursor(bad, 2)


async def test_the_thread_stream_carries_every_turn_deltas_and_ends_when_deleted(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)]) as api, over_tcp(api.app) as c:
        thread = await a_thread(c, agent="streamer")
        base = f"/v1/threads/{thread['id']}"
        live: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read(c, f"{base}/events", live))
        first = await say(c, thread["id"], "note one")

        async def until(what: str, check: Any) -> None:
            deadline = time.monotonic() + PATIENCE
            while not check():
                assert not reader.done(), (what, live)
                assert time.monotonic() < deadline, (what, live)
                await asyncio.sleep(0.02)

        await until("turn 1 ends", lambda: any(e["data"]["type"] == "turn.end" for e in live))
        assert not reader.done()  # a thread stream stays open between turns
        second = await say(c, thread["id"], "two")
        await until("turn 2 ends", lambda: sum(
            e["data"]["type"] == "turn.end" for e in live) == 2)
        # A stale delta (of a turn already ended) is never sent after its turn.
        assert api.app.state.alpaca.engine.events is not None
        await api.app.state.alpaca.engine.events.publish(second["id"], {
            "type": "message.delta", "run_id": second["id"], "step": 1, "attempt": 1,
            "index": 99, "text": "late"})
        assert (await c.delete(base)).status_code == 200
        assert await asyncio.wait_for(reader, PATIENCE)  # the server closed the stream

        kinds = [e["data"]["type"] for e in live]
        assert kinds[-1] == "thread.deleted"
        records = [e for e in live if e["data"]["type"] == "audit"]
        audit1 = (await c.get(f"/v1/runs/{first['id']}/audit")).json()["items"]
        assert audit1 == []  # erased since; the stream had them
        by_turn = {t: [e for e in records if e["data"]["turn"] == t] for t in (1, 2)}
        assert {e["data"]["run_id"] for e in by_turn[1]} == {first["id"]}
        assert {e["data"]["run_id"] for e in by_turn[2]} == {second["id"]}
        for turn_records in by_turn.values():
            seqs = [e["data"]["record"]["seq"] for e in turn_records]
            assert seqs == list(range(1, len(seqs) + 1))
        assert records.index(by_turn[2][0]) > records.index(by_turn[1][-1])  # turn order
        ends = [e for e in live if e["data"]["type"] == "turn.end"]
        assert [(e["data"]["turn"], e["data"]["state"]) for e in ends] == [
            (1, "succeeded"), (2, "succeeded")]
        assert all("id" not in e for e in ends)
        assert ends[0]["data"]["answer"] == first["output"]
        assert ends[1]["data"]["last_event_id"] == by_turn[2][-1]["id"]
        assert by_turn[2][-1]["id"] == (f"1:{len(by_turn[1])},2:{len(by_turn[2])}")
        # The streaming model's pieces of turn 2 came live, before the turn's end, and
        # spell its answer; none has an id (they are never replayed).
        pieces = [e for e in live if e["data"]["type"] == "message.delta"
                  and e["data"]["run_id"] == second["id"]]
        assert pieces and all(e["data"]["turn"] == 2 and "id" not in e for e in pieces)
        assert live.index(pieces[-1]) < live.index(ends[1])
        assert "".join(e["data"]["text"] for e in pieces if e["data"].get("text")) == \
            second["output"]


async def test_a_thread_stream_resumes_after_its_last_event_id(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)]) as api, over_tcp(api.app) as c:
        thread = await a_thread(c)
        base = f"/v1/threads/{thread['id']}"
        await say(c, thread["id"], "note one")
        await say(c, thread["id"], "two")
        everything: list[dict[str, Any]] = []
        reader = asyncio.create_task(_read(c, f"{base}/events", everything))
        deadline = time.monotonic() + PATIENCE
        while sum(e["data"]["type"] == "turn.end" for e in everything) < 2:
            assert time.monotonic() < deadline, everything
            await asyncio.sleep(0.02)
        records = [e for e in everything if e["data"]["type"] == "audit"]
        middle = [e for e in records if e["data"]["turn"] == 2][1]  # turn 1 all sent before
        resumed: list[dict[str, Any]] = []
        again = asyncio.create_task(_read(c, f"{base}/events", resumed,
                                          {"Last-Event-ID": middle["id"]}))
        while sum(e["data"]["type"] == "turn.end" for e in resumed) < 1:
            assert time.monotonic() < deadline, resumed
            await asyncio.sleep(0.02)
        assert (await c.delete(base)).status_code == 200
        await asyncio.wait_for(asyncio.gather(reader, again), PATIENCE)
        after = [e for e in resumed if e["data"]["type"] == "audit"]
        assert [e["id"] for e in after] == [e["id"] for e in records[records.index(middle) + 1:]]
        assert [e["data"]["turn"] for e in resumed if e["data"]["type"] == "turn.end"] == [2]
        bad = await c.get(f"{base}/events", headers={"Last-Event-ID": "1:2,9:1"})
        assert_problem(bad, 404, "not_found")  # deleted meanwhile: nothing to resume


async def test_a_bad_thread_cursor_is_422(start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)]) as api, api.client() as c:
        thread = await a_thread(c)
        await say(c, thread["id"], "hi")
        for bad, needle in (("7", "not a thread cursor"), ("1:2,9:1", "the thread has 1")):
            r = await c.get(f"/v1/threads/{thread['id']}/events",
                            headers={"Last-Event-ID": bad})
            assert needle in assert_problem(r, 422, "invalid_position")["detail"]


@pytest.mark.postgres
async def test_concurrent_posters_on_postgresql_make_one_turn_and_a_409_each(
        chat_workflow: Path) -> None:
    """The same race through HTTP on the real PostgreSQL: replicas of the API would each
    hold their own connections; here one app serves the posters concurrently on its pool."""
    async with pg_schema() as (schema, _admin):
        store = PostgresStore(PG_URL, schema=schema, pool_size=12)
        await store.open()
        app = create_app(Settings(database_url="sqlite:///unused.db", lease_seconds=30),
                         store=store, embedded_worker=False, workflows=[str(chat_workflow)])
        try:
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app), base_url="http://api.test") as c:
                thread = await a_thread(c)
                url = f"/v1/threads/{thread['id']}/messages"
                answers = await asyncio.gather(*(c.post(url, json={"content": f"m{n}"})
                                                 for n in range(10)))
                created = [r for r in answers if r.status_code == 201]
                assert len(created) == 1, [r.text for r in answers]
                for refused in (r for r in answers if r is not created[0]):
                    assert assert_problem(refused, 409, "turn_in_progress")["run_id"] == \
                        created[0].json()["id"]
                assert len((await c.get(url)).json()["items"]) == 1
        finally:
            await store.close()


def versioned(tag: str) -> str:
    return textwrap.dedent(f"""
        version: 1
        name: talker
        agents:
          - name: talker
            model:
              provider: scripted
              script: ["{tag} first answer", "{tag} second answer"]
    """).lstrip("\n")


async def test_a_thread_pins_its_registered_workflow_version_for_every_turn(
        start_api: ApiFactory) -> None:
    keys = {"ann": ("acme", "builder")}
    yaml = {"content-type": "application/yaml"}
    async with start_api(keys=keys) as api, api.client("ann") as c:
        assert (await c.post("/v1/workflows", content=versioned("v1"),
                             headers=yaml)).status_code == 201
        thread = await a_thread(c, agent="talker", workflow="talker")
        assert (thread["workflow"], thread["workflow_version"]) == ("registry:talker@1", 1)
        assert (await say(c, thread["id"], "hi"))["output"] == "v1 first answer"
        assert (await c.post("/v1/workflows", content=versioned("v2"),
                             headers=yaml)).json()["version"] == 2
        second = await say(c, thread["id"], "again")  # a scripted model continues its script
        assert (second["output"], second["workflow"]) == ("v1 second answer",
                                                          "registry:talker@1")
        newer = await a_thread(c, agent="talker", workflow="talker")
        assert newer["workflow"] == "registry:talker@2"


async def test_a_message_to_a_thread_whose_workflow_no_longer_loads_is_422(
        start_api: ApiFactory, chat_workflow: Path) -> None:
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        thread = await a_thread(c)
        chat_workflow.rename(chat_workflow.with_suffix(".gone"))  # noqa: ASYNC240
        r = await c.post(f"/v1/threads/{thread['id']}/messages", json={"content": "hi"})
        detail = assert_problem(r, 422, "workflow_error")["detail"]
        assert thread["id"] in detail and "cannot read the file" in detail
        assert (await c.get(f"/v1/threads/{thread['id']}/messages")).json()["items"] == []


async def test_metadata_the_stores_cannot_keep_is_422(start_api: ApiFactory,
                                                      chat_workflow: Path) -> None:
    headers = {"content-type": "application/json"}
    async with start_api(workflows=[str(chat_workflow)], worker=False) as api, \
            api.client() as c:
        for body, needle in ((b'{"agent": "memo", "metadata": {"k": "a\\ud800"}}', "surrogate"),
                             (b'{"agent": "memo", "metadata": {"a\\u0000": 1}}', "NUL")):
            r = await c.post("/v1/threads", content=body, headers=headers)
            assert needle in assert_problem(r, 422, "validation_error")["detail"]
        kept = await a_thread(c, metadata={"k": "\\u0000 as text", "emoji": "\U0001f600"})
        assert kept["metadata"] == {"k": "\\u0000 as text", "emoji": "\U0001f600"}
        assert (await c.get("/v1/threads")).status_code == 200

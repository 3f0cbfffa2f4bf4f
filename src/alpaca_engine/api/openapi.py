"""The published OpenAPI document: FastAPI's, corrected where it cannot say what we send.

* Error responses are ``application/problem+json`` whatever the route's own media type
  (FastAPI files them under ``application/json``, or ``text/plain`` for ``/metrics``).
* Operations that need no key say so (``security: []``) instead of saying nothing.
* Server-Sent Event streams document one event: its ``id`` and its JSON ``data``, a union of
  event types told apart by ``type``, so generated clients get the types.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from .models import RunStreamEvent
from .models_threads import ThreadStreamEvent
from .problems import PROBLEM_JSON

SERVERS = [{"url": "/", "description": "The server this document was fetched from."}]

STREAMS: dict[str, tuple[str, Any]] = {
    "/v1/runs/{run_id}/events": ("RunStreamEvent", RunStreamEvent),
    "/v1/threads/{thread_id}/events": ("ThreadStreamEvent", ThreadStreamEvent),
}
"""Path → (component name, type of each event's ``data``) of every SSE endpoint."""

_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def build(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         routes=app.routes, servers=SERVERS)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            operation.setdefault("security", [])
            _problem_json(operation)
            if path in STREAMS and method == "get":
                _stream(operation, components, *STREAMS[path])
    return schema


def _problem_json(operation: dict[str, Any]) -> None:
    for code, response in operation.get("responses", {}).items():
        content = response.get("content")
        if content and (code == "default" or int(code) >= 400):
            media = next(iter(content.values()))
            response["content"] = {PROBLEM_JSON: media}


def _stream(operation: dict[str, Any], components: dict[str, Any], name: str,
            event_type: Any) -> None:
    """Document one SSE event of the 200 response, its data a union of ``event_type``."""
    union = TypeAdapter(event_type).json_schema(ref_template="#/components/schemas/{model}",
                                                mode="serialization")
    for model, model_schema in union.pop("$defs", {}).items():
        components.setdefault(model, model_schema)
    components[name] = {"description": "The JSON `data` of one event, told apart by "
                        "`type`. Ignore types you do not know: new ones are added.", **union}
    event = {
        "type": "object",
        "description": "One Server-Sent Event, always the default `message` event (no "
                       "`event:` field), so `EventSource.onmessage` receives every event.",
        "required": ["data"],
        "properties": {
            "id": {"type": "string", "description": "Durable events only: the position to "
                   "resume after (send it back as Last-Event-ID). Ephemeral events have none."},
            "data": {"$ref": f"#/components/schemas/{name}"},
        },
    }
    operation["responses"]["200"]["content"] = {"text/event-stream": {"schema": event}}

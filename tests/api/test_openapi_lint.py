"""`/openapi.json` is lint-clean: valid OpenAPI 3.1, and it says what the server really sends.

Two layers: ``openapi-spec-validator`` checks the document against the OpenAPI 3.1 schema and
its semantic rules (unique operationIds, declared path parameters, resolvable references);
:func:`lint` adds the rules a client generator depends on and that a valid document can
still break (error media types, explicit security, servers, stream events). Both are shown
to fail on a real mistake, so a green run means something. Schemathesis
(test_schemathesis.py) then checks real responses against the document.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from alpaca_engine.api import create_app
from alpaca_engine.api.problems import PROBLEM_JSON

PUBLIC = {("/healthz", "get"), ("/readyz", "get")}
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    doc: dict[str, Any] = create_app().openapi()
    return copy.deepcopy(doc)


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def lint(doc: dict[str, Any]) -> list[str]:
    """The house rules; each problem names where it is."""
    problems: list[str] = []
    if not doc.get("servers"):
        problems.append("servers: missing (clients need a base URL)")
    schemes = doc.get("components", {}).get("securitySchemes", {})
    for ref in set(refs(doc)):
        try:
            resolve(doc, ref)
        except (KeyError, TypeError):
            problems.append(f"{ref}: does not resolve")
    for path, method, op in operations(doc):
        where = f"{method.upper()} {path}"
        if not (op.get("summary") or op.get("description")):
            problems.append(f"{where}: no summary or description")
        if not op.get("tags"):
            problems.append(f"{where}: no tags")
        if "security" not in op:
            problems.append(f"{where}: security not stated (use [] for a public operation)")
        elif (path, method) in PUBLIC and op["security"] != []:
            problems.append(f"{where}: public, so security must be []")
        elif (path, method) not in PUBLIC and not op["security"]:
            problems.append(f"{where}: needs the API key")
        for requirement in op.get("security", []):
            for name in requirement:
                if name not in schemes:
                    problems.append(f"{where}: security scheme {name!r} is not defined")
        for code, response in op.get("responses", {}).items():
            content = response.get("content", {})
            is_problem = list(content) == [PROBLEM_JSON] and content[PROBLEM_JSON].get(
                "schema", {}).get("$ref") == "#/components/schemas/Problem"
            if (code == "default" or int(code) >= 400) and not is_problem:
                problems.append(f"{where} {code}: errors are {PROBLEM_JSON} Problem, "
                                f"documented as {sorted(content)}")
            for media, body in content.items():
                if "schema" not in body:
                    problems.append(f"{where} {code} {media}: no schema")
            stream = content.get("text/event-stream")
            if stream is not None:
                data = stream.get("schema", {}).get("properties", {}).get("data", {})
                if "$ref" not in data:
                    problems.append(f"{where} {code}: a stream must document its event data")
    return problems


def test_the_document_is_valid_openapi_31_and_passes_the_house_rules(
        document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)
    assert lint(document) == []


def test_what_the_issue_reported_is_fixed(document: dict[str, Any]) -> None:
    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"]
    assert list(metrics["401"]["content"]) == [PROBLEM_JSON]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    assert document["paths"]["/readyz"]["get"]["security"] == []
    assert document["servers"]
    events = document["paths"]["/v1/runs/{run_id}/events"]["get"]["responses"]
    assert "204" in events
    union = document["components"]["schemas"]["RunStreamEvent"]
    assert union["discriminator"]["propertyName"] == "type"
    assert set(union["discriminator"]["mapping"]) == {"audit", "message.delta", "end"}


def test_both_layers_fail_on_real_mistakes(document: dict[str, Any]) -> None:
    broken = copy.deepcopy(document)
    del broken["paths"]["/v1/runs"]["get"]["responses"]["200"]["description"]
    with pytest.raises(OpenAPIValidationError):
        validate(broken)

    broken = copy.deepcopy(document)
    metrics = broken["paths"]["/metrics"]["get"]
    metrics["responses"]["401"]["content"] = {
        "text/plain": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    del broken["paths"]["/healthz"]["get"]["security"]
    del broken["servers"]
    broken["paths"]["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"] = {
        "text/event-stream": {"schema": {"type": "string"}}}
    assert set(lint(broken)) == {
        "servers: missing (clients need a base URL)",
        "GET /v1/runs/{run_id}/events 200: a stream must document its event data",
        "GET /metrics 401: errors are application/problem+json Problem, documented as "
        "['text/plain']",
        "GET /healthz: security not stated (use [] for a public operation)",
    }

"""A typed agent's output schema as OpenAI's native ``response_format`` (structured outputs).

Strict mode makes the provider's decoder follow the schema exactly, but only accepts a
subset of JSON Schema: every object closed (``additionalProperties: false``) with every
property required, a fixed set of keywords, an object at the root. A schema outside that
subset is sent with ``strict: false`` (the model is steered, not bound); a schema whose
root is not an object is not sent at all (the API requires one) and the model is told the
schema in a system message instead. The runner validates the answer in every case.
"""

from __future__ import annotations

import json
import re
from typing import Any

STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "anyOf", "$ref", "$defs", "definitions", "description", "title", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "minItems", "maxItems"})
"""Keywords strict mode accepts (OpenAI structured outputs, supported schemas)."""
MAX_STRICT_DEPTH = 10
_NAME = re.compile(r"[^A-Za-z0-9_-]")


def response_format(schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The ``response_format`` body field for ``schema``, or None when it cannot be sent."""
    if schema.get("type") != "object":
        return None
    return {"type": "json_schema", "json_schema": {
        "name": _NAME.sub("_", name)[:64] or "output", "schema": schema,
        "strict": strict_compatible(schema)}}


def schema_instruction(schema: dict[str, Any]) -> str:
    """What a model is told when the schema cannot go in ``response_format``."""
    return ("Answer with only a JSON value (no prose, no code fence) that matches this "
            f"JSON Schema: {json.dumps(schema, sort_keys=True)}")


def strict_compatible(schema: dict[str, Any]) -> bool:
    """Whether strict mode accepts ``schema`` (see the module doc)."""
    if schema.get("type") != "object" or "anyOf" in schema:
        return False
    return _strict(schema, 0)


def _strict(node: Any, depth: int) -> bool:
    if not isinstance(node, dict) or depth > MAX_STRICT_DEPTH:
        return False
    if not set(node) <= STRICT_KEYWORDS:
        return False
    types = node.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) \
        or "properties" in node
    if is_object:
        properties = node.get("properties", {})
        if node.get("additionalProperties") is not False or not isinstance(properties, dict):
            return False
        if set(node.get("required", [])) != set(properties):
            return False
        if not all(_strict(p, depth + 1) for p in properties.values()):
            return False
    elif "additionalProperties" in node and node["additionalProperties"] is not False:
        return False
    children: list[Any] = []
    if "items" in node:
        children.append(node["items"])
    children += node.get("anyOf", [])
    for key in ("$defs", "definitions"):
        children += list((node.get(key) or {}).values())
    return all(_strict(child, depth + 1) for child in children)

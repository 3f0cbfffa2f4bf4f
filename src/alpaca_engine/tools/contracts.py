"""JSON Schema (Draft 2020-12) contracts for tool inputs and outputs.

Validation uses ``jsonschema-rs``: a compiled, standards-conformant validator that is fast
enough to sit on every step of the hot path.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs

DRAFT = "https://json-schema.org/draft/2020-12/schema"
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024


class SchemaError(ValueError):
    """The schema itself is not a valid JSON Schema."""


class Contract:
    """A compiled schema that reports every violation with the JSON path where it occurred."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        try:
            self._validator = jsonschema_rs.validator_for(schema)
        except (jsonschema_rs.ValidationError, ValueError) as exc:
            raise SchemaError(f"invalid JSON Schema: {str(exc).splitlines()[0]}") from exc

    def errors(self, instance: Any) -> list[str]:
        out = []
        for err in self._validator.iter_errors(instance):
            path = "/" + "/".join(str(p) for p in err.instance_path)
            out.append(f"at {path}: {err.message}")
        return out


MAX_NESTING = 64
"""Deepest arrays/objects a tool argument or result may nest: real payloads stay far below,
and the JSON parser, the validator and the stores all recurse on depth."""


def payload_size(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def nesting_exceeds(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether ``value`` nests containers deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list | tuple))
    return False


def too_deep_message(what: str, limit: int = MAX_NESTING) -> str:
    return f"{what} nest deeper than {limit} levels of arrays/objects (the limit is {limit})"


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a model's raw argument string; return ``(args, error)``."""
    # Only text with more than MAX_NESTING brackets can be too deep: a cheap bound first.
    deep = raw.count("[") + raw.count("{") > MAX_NESTING
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        return None, f"arguments are not valid JSON: {exc.msg} at {where}"
    except RecursionError:
        return None, too_deep_message("arguments")
    if deep and nesting_exceeds(value):
        return None, too_deep_message("arguments")
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None

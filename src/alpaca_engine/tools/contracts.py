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


def payload_size(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a model's raw argument string; return ``(args, error)``."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        return None, f"arguments are not valid JSON: {exc.msg} at {where}"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None

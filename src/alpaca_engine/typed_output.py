"""Typed outputs (DESIGN §10): an agent's final answer checked against its output schema.

Pure: the runner asks :func:`check` of every final answer of a typed agent (again on
replay, which gives the same verdict, so a resumed run sends the same corrections), and
turns a violation into the correction the model gets next. A typed run stores the
canonical JSON text of the validated value (``output_type = "json"``); :func:`parsed` is
how the API, the CLI and a delegating parent read it back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from .tools.contracts import Contract, SchemaError, nesting_exceeds, too_deep_message

_FENCE = re.compile(r"\A\s*```(?:json|JSON)?\s*\n(.*?)\n?\s*```\s*\Z", re.DOTALL)
MAX_PROBLEM = 1000
"""The validator's message is cut to this many characters (the model and the run get it)."""


def contract_for(schema: dict[str, Any] | None, output_type: Any = None) -> Contract | None:
    """The compiled output contract of an agent (``None``: free text). A Python type is
    turned into its JSON Schema by pydantic; a schema that does not compile raises
    :class:`~alpaca_engine.tools.contracts.SchemaError` when the agent is made."""
    if schema is None and output_type is not None:
        try:
            schema = TypeAdapter(output_type).json_schema()
        except Exception as exc:  # pydantic's own errors for types it cannot describe
            raise SchemaError(f"output_type {output_type!r} has no JSON Schema: "
                              f"{str(exc).splitlines()[0]}") from None
    return Contract(schema) if schema is not None else None


@dataclass(frozen=True)
class Verdict:
    text: str | None = None
    """The canonical JSON text of the valid value (what the run stores as its output)."""
    problem: str | None = None
    """Why the answer is not valid (the validator's message), or None."""


def check(contract: Contract, content: str | None) -> Verdict:
    """Parse ``content`` as JSON (a ```json fence around it is allowed) and validate it."""
    text = (content or "").strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if not text:
        return Verdict(problem="the answer is empty; expected a JSON value")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return Verdict(problem=f"the answer is not JSON: {exc.msg} at line {exc.lineno} "
                               f"column {exc.colno}")
    except RecursionError:
        return Verdict(problem=too_deep_message("the answer's arrays/objects"))
    if nesting_exceeds(value):
        return Verdict(problem=too_deep_message("the answer's arrays/objects"))
    errors = contract.errors(value)
    if errors:
        problem = "; ".join(errors)
        if len(problem) > MAX_PROBLEM:
            problem = problem[:MAX_PROBLEM - 1] + "…"
        return Verdict(problem=f"the answer does not match the output schema: {problem}")
    return Verdict(text=canonical(value))


def canonical(value: Any) -> str:
    """One text for one value: sorted keys, no spaces, Unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def correction(problem: str) -> str:
    """The message a typed agent gets after an invalid final answer."""
    return (f"Your final answer was rejected: {problem}. Reply with only a JSON value that "
            "matches the required output schema, nothing else.")

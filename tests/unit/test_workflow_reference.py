"""docs/workflow-reference.md is generated from the schema and must match it."""

from __future__ import annotations

from pathlib import Path

from alpaca_engine.workflows import reference
from alpaca_engine.workflows.schema import AgentSpec, DefaultsSpec, WorkflowSpec

PAGE = Path(__file__).resolve().parents[2] / "docs" / "workflow-reference.md"
REGENERATE = "uv run python -m alpaca_engine.workflows.reference > docs/workflow-reference.md"


def test_the_committed_reference_is_what_the_schema_generates() -> None:
    assert PAGE.read_text() == reference.render(), f"out of date; run: {REGENERATE}"


def test_every_field_has_a_meaning_and_no_meaning_is_stale() -> None:
    assert reference.missing_descriptions() == [], "describe these in workflows/reference.py"
    assert reference.stale_descriptions() == [], "these fields no longer exist"


def test_every_spec_and_field_is_on_the_page_with_its_default() -> None:
    page = reference.render()
    documented = {s.spec for s in reference.sections()}
    assert {WorkflowSpec, DefaultsSpec, AgentSpec} <= documented
    for section in reference.sections():
        for name in section.spec.model_fields:
            assert f"| `{name}` |" in page
    assert "| `max_depth` | integer | `3` | ≥ 0 |" in page
    assert "| `provider` | `scripted` | **required** |" in page
    assert "| `on_reject` | `return` or `fail` | `\"return\"` |" in page

"""The conversation digest's message encoding, spelled out for speed, is byte for byte the
canonical JSON it is defined as (a journal written before must keep replaying)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from alpaca_engine.journal import _message_bytes, conversation_digest
from alpaca_engine.models.base import Message, ToolCall


def canonical(message: Message) -> bytes:
    return json.dumps(message.model_dump(exclude_none=True), sort_keys=True).encode() + b"\n"


text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates too
optional = st.none() | text
calls = st.lists(st.builds(ToolCall, id=text, name=text, arguments=text), max_size=3)


@given(role=st.sampled_from(["system", "user", "assistant", "tool"]), content=optional,
       tool_calls=calls, tool_call_id=optional, name=optional)
def test_message_bytes_are_the_canonical_json(role, content, tool_calls, tool_call_id, name):
    message = Message(role=role, content=content, tool_calls=tool_calls,
                      tool_call_id=tool_call_id, name=name)
    assert _message_bytes(message) == canonical(message)


class Annotated(Message):
    note: str = "extra"


class TaggedCall(ToolCall):
    tag: str = "t"


def test_subclasses_take_the_generic_encoding():
    for message in (Annotated(role="user", content="hi"),
                    Message(role="assistant", tool_calls=[TaggedCall(id="1", name="n")])):
        assert _message_bytes(message) == canonical(message)


def test_a_known_conversation_keeps_its_digest():
    """Journals already written hold this digest (computed before the encoding was spelled
    out): it may never change."""
    messages = [Message(role="system", content="Be useful."),
                Message(role="user", content="go \u00e9"),
                Message(role="assistant", tool_calls=[ToolCall(id="call_0_0", name="add",
                                                               arguments='{"a": 1}')]),
                Message(role="tool", tool_call_id="call_0_0", name="add", content="2")]
    assert conversation_digest(messages) == (
        "acf60207a56517a4e7184b3ee8b2e34eb4cf469635b1b274b478bb3b2c5eba7f")

"""Replay: rebuild a run's conversation and position from its journaled steps.

Completed steps are answered from the journal and never executed again; a step left
``started`` by a crash is executed again under the same idempotency key. The same decoding
(:func:`recorded_response`, :func:`recorded_result`, :func:`tool_message`) serves the
runner's replay of its own run and :func:`replayed_messages`, the earlier turns of a thread
(history.py): both send the model exactly what the journal says it was sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from .models.base import Message, ModelResponse, ToolCall
from .store.records import StepKind, StepRecord, StepStatus


def _message_bytes(message: Message) -> bytes:
    """What the digest hashes of a message: its canonical JSON (``exclude_none``, keys
    sorted, ``json.dumps`` defaults) and a newline. A plain Message (every message the
    engine builds) is spelled out field by field, byte for byte that text: two messages a
    turn, so no dump to a dict and no generic encoder walk over it."""
    if type(message) is not Message:
        return _dumped_bytes(message)
    calls = []
    for c in message.tool_calls:
        if type(c) is not ToolCall:
            return _dumped_bytes(message)
        calls.append(f'{{"arguments": {_quote(c.arguments)}, "id": {_quote(c.id)}, '
                     f'"name": {_quote(c.name)}}}')
    text = "{"
    if message.content is not None:
        text += f'"content": {_quote(message.content)}, '
    if message.name is not None:
        text += f'"name": {_quote(message.name)}, '
    text += f'"role": {_quote(message.role)}, '
    if message.tool_call_id is not None:
        text += f'"tool_call_id": {_quote(message.tool_call_id)}, '
    return f'{text}"tool_calls": [{", ".join(calls)}]}}\n'.encode()


def _dumped_bytes(message: Message) -> bytes:
    """The definition :func:`_message_bytes` spells out (any Message subclass takes it)."""
    return json.dumps(message.model_dump(exclude_none=True), sort_keys=True).encode() + b"\n"


def conversation_digest(messages: Sequence[Message]) -> str:
    """A fingerprint of what the model is sent, journaled to prove resumes are faithful."""
    h = hashlib.sha256()
    for m in messages:
        h.update(_message_bytes(m))
    return h.hexdigest()


class Conversation:
    """The messages of a run with a running digest: O(1) per turn instead of rehashing all."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._hash = hashlib.sha256()
        self.chars = 0
        """Characters of content and tool-call arguments so far (for token estimates)."""

    def append(self, message: Message) -> None:
        self.messages.append(message)
        self._hash.update(_message_bytes(message))
        self.chars += message_chars(message)

    def digest(self) -> str:
        return self._hash.copy().hexdigest()

    def __len__(self) -> int:
        return len(self.messages)


def message_chars(message: Message) -> int:
    """Characters of a message's content and tool calls (for token estimates)."""
    return len(message.content or "") + sum(
        len(c.arguments) + len(c.name) for c in message.tool_calls)


def estimate_tokens(chars: int, messages: int) -> int:
    """A cheap upper-ish estimate (4 characters a token, plus a few per message)."""
    return chars // 4 + 4 * messages


def idempotency_key(run_id: str, seq: int) -> str:
    return f"{run_id}:{seq}"


def tool_message(call_id: str, name: str, result: Any) -> Message:
    return Message(role="tool", tool_call_id=call_id, name=name,
                   content=json.dumps(result, sort_keys=True, default=str))


def recorded_response(step: StepRecord) -> ModelResponse:
    """The model turn a finished model step journaled (redacted once, when it was made)."""
    return ModelResponse.model_validate(step.output)


def recorded_result(step: StepRecord) -> Any:
    """What the model was given for a finished tool or delegation step: its error or output."""
    return {"error": step.error} if step.error else step.output


def replayed_messages(steps: Iterable[StepRecord]) -> list[Message]:
    """The assistant turns and tool results a run exchanged with its model, rebuilt from its
    journal in the runner's order (model step, then one step per tool call it made); stops
    before the first model turn whose steps did not all finish."""
    journal = Journal(steps)
    messages: list[Message] = []
    seq = 1
    while (step := journal.finished(seq, StepKind.MODEL)) is not None \
            and step.status == StepStatus.COMPLETED:
        response = recorded_response(step)
        turn = [response.as_message()]
        for call in response.tool_calls:
            seq += 1
            done = journal.get(seq)
            if done is None or done.status == StepStatus.STARTED or done.kind not in (
                    StepKind.TOOL, StepKind.DELEGATION):
                return messages
            turn.append(tool_message(call.id, call.name, recorded_result(done)))
        messages += turn
        if not response.tool_calls:
            break
        seq += 1
    return messages


class Journal:
    def __init__(self, steps: Iterable[StepRecord]) -> None:
        self._steps = {s.seq: s for s in steps}

    def get(self, seq: int) -> StepRecord | None:
        return self._steps.get(seq)

    def finished(self, seq: int, kind: StepKind) -> StepRecord | None:
        """The recorded outcome of step ``seq`` if it finished, for replay."""
        step = self._steps.get(seq)
        if step is None or step.kind != kind or step.status == StepStatus.STARTED:
            return None
        return step

    def __len__(self) -> int:
        return len(self._steps)

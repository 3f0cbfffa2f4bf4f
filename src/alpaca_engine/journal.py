"""Replay: rebuild a run's conversation and position from its journaled steps.

Completed steps are answered from the journal and never executed again; a step left
``started`` by a crash is executed again under the same idempotency key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from .models.base import Message
from .store.records import StepKind, StepRecord, StepStatus


def _message_bytes(message: Message) -> bytes:
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
        self.chars += len(message.content or "") + sum(
            len(c.arguments) + len(c.name) for c in message.tool_calls)

    def digest(self) -> str:
        return self._hash.copy().hexdigest()

    def __len__(self) -> int:
        return len(self.messages)


def idempotency_key(run_id: str, seq: int) -> str:
    return f"{run_id}:{seq}"


def tool_message(call_id: str, name: str, result: Any) -> Message:
    return Message(role="tool", tool_call_id=call_id, name=name,
                   content=json.dumps(result, sort_keys=True, default=str))


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

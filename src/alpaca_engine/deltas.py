"""A streaming model's deltas as ``message.delta`` progress events (DESIGN §10).

Ephemeral: the runner emits them (the Engine forwards them to its sink and the event bus,
so SSE clients see the answer as it is written) but never journals them; the completed
turn is journaled as for any model. Each event names its model step and attempt, and
counts from 0 within them, so a client can tell a restarted stream (a new ``attempt``:
discard what it showed for that step) and a gap (an ``index`` it did not see).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .events import EventSink
from .models.base import ModelDelta
from .telemetry.logging import redact_text
from .telemetry.stream_redaction import StreamRedactor


class DeltaEvents:
    """Turns one model step's deltas into redacted, numbered ``message.delta`` events."""

    def __init__(self, emit: EventSink, run_id: str, step: int,
                 attempt: Callable[[], int]) -> None:
        self._emit = emit
        self._run_id = run_id
        self._step = step
        self._attempt = attempt
        self._current = 0
        self._index = 0
        self._text = StreamRedactor()
        self._calls: dict[int, StreamRedactor] = {}

    def __call__(self, delta: ModelDelta) -> None:
        attempt = self._attempt()
        if attempt != self._current:  # a retried stream starts the turn over
            self._current, self._index = attempt, 0
            self._text, self._calls = StreamRedactor(), {}
        if delta.text is not None:
            text = self._text.feed(delta.text)
            if text:
                self._send({"text": text})
        call = delta.tool_call
        if call is not None:
            redactor = self._calls.setdefault(call.index, StreamRedactor())
            arguments = redactor.feed(call.arguments)
            if arguments or call.id is not None or call.name is not None:
                self._send_call(call.index, call.id, call.name, arguments)

    def finish(self) -> None:
        """Send what the redactors held back: the turn is complete."""
        text = self._text.flush()
        if text:
            self._send({"text": text})
        for index, redactor in self._calls.items():
            arguments = redactor.flush()
            if arguments:
                self._send_call(index, None, None, arguments)

    def _send_call(self, index: int, call_id: str | None, name: str | None,
                   arguments: str) -> None:
        self._send({"tool_call": {
            "index": index,
            "id": redact_text(call_id) if call_id is not None else None,
            "name": redact_text(name) if name is not None else None,
            "arguments": arguments}})

    def _send(self, body: dict[str, Any]) -> None:
        self._emit({"type": "message.delta", "run_id": self._run_id, "step": self._step,
                    "attempt": self._current, "index": self._index, **body})
        self._index += 1

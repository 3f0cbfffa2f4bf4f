"""Chat-completions stream chunks → deltas as they come, and the completed turn at the end.

Pure (no I/O): :class:`ChunkAccumulator` is fed the SDK's ``ChatCompletionChunk`` objects.
Tool-call pieces are accumulated by their ``index`` (the id and name come with the first
piece, the arguments in fragments); usage comes from the last chunk, which OpenAI sends
(with no choices) when the request asked ``stream_options: {include_usage: true}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import ModelDelta, ModelError, ModelResponse, ToolCall, ToolCallDelta, Usage


@dataclass
class _Call:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ChunkAccumulator:
    def __init__(self, name: str, turn: int) -> None:
        self._name = name
        self._turn = turn
        self._text: list[str] = []
        self._calls: dict[int, _Call] = {}
        self.chunks = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None

    def add(self, chunk: Any) -> list[ModelDelta]:
        """The deltas one chunk carries (choice 0 only: the engine asks for one choice)."""
        self.chunks += 1
        self.model = getattr(chunk, "model", None) or self.model
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.usage = Usage(input_tokens=usage.prompt_tokens or 0,
                               output_tokens=usage.completion_tokens or 0)
        out: list[ModelDelta] = []
        for choice in getattr(chunk, "choices", None) or []:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None and delta.content:
                self._text.append(delta.content)
                out.append(ModelDelta(text=delta.content))
            for piece in (delta.tool_calls if delta is not None else None) or []:
                call = self._calls.setdefault(piece.index, _Call())
                function = piece.function
                name = function.name if function is not None else None
                arguments = (function.arguments or "") if function is not None else ""
                if piece.id:
                    call.id = piece.id
                if name:
                    call.name += name
                call.arguments.append(arguments)
                out.append(ModelDelta(tool_call=ToolCallDelta(
                    index=piece.index, id=piece.id or None, name=name or None,
                    arguments=arguments)))
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
        return out

    @property
    def chars(self) -> int:
        return sum(map(len, self._text)) + sum(
            len(c.name) + sum(map(len, c.arguments)) for c in self._calls.values())

    def response(self, estimated_input_tokens: int) -> ModelResponse:
        """The completed turn. A stream without a finish reason was cut off (transient: the
        turn is asked again); one without usage (a server that ignores ``include_usage``)
        is charged an estimate, so the budget still counts it."""
        if self.finish_reason is None:
            raise ModelError(f"{self._name}: the stream ended before the model finished "
                             f"(after {self.chunks} chunks): the connection was cut",
                             transient=True)
        usage = self.usage or Usage(input_tokens=estimated_input_tokens,
                                    output_tokens=self.chars // 4 + 1)
        calls = [ToolCall(id=c.id or f"call_{self._turn}_{index}", name=c.name,
                          arguments="".join(c.arguments) or "{}")
                 for index, c in sorted(self._calls.items())]
        return ModelResponse(content="".join(self._text) if self._text else None,
                             tool_calls=calls, usage=usage, model=self.model,
                             finish_reason=self.finish_reason)

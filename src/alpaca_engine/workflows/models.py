"""Model specs from a workflow file to ``Model`` instances.

Failures are raised as ``SpecError`` with a location relative to the model spec, so the loader
can point at the exact line (``function:`` that does not import, an unset key variable).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..models.base import Message, Model, ModelError, ModelResponse, ModelSettings, ToolSpec
from ..models.function import FunctionModel
from ..models.scripted import ScriptedModel
from .schema import (
    FunctionModelSpec,
    ModelSpec,
    OpenAIModelSpec,
    ScriptedModelSpec,
    SpecError,
)

Resolver = Callable[[str], Any]
"""Turns ``module:attribute`` into the object; raises ``SpecError`` with an empty location."""

# What OpenAIModel sends as the key to servers that ignore auth (vLLM, Ollama, ...).
_NO_KEY = "unused"


def build_model(spec: ModelSpec, resolve: Resolver) -> Model:
    """Build the model one agent uses; ``resolve`` imports ``function:`` paths."""
    if isinstance(spec, ScriptedModelSpec):
        return _scripted(spec)
    if isinstance(spec, FunctionModelSpec):
        return _function(spec, resolve)
    return _openai(spec)


def _scripted(spec: ScriptedModelSpec) -> ScriptedModel:
    # ScriptedModel takes the plain shorthand; dump drops unset ids so it numbers calls itself.
    script = [item if isinstance(item, str) else item.model_dump(exclude_none=True)
              for item in spec.script]
    return ScriptedModel(script, name=spec.name or "scripted", stream=spec.stream,
                         chunk_size=spec.chunk_size, delay=spec.delay)


def _function(spec: FunctionModelSpec, resolve: Resolver) -> FunctionModel:
    try:
        fn = resolve(spec.function)
    except SpecError as exc:
        raise exc.within("function") from None
    if inspect.isclass(fn) or not callable(fn):
        raise SpecError(("function",), f"{spec.function!r} is not a function")
    return FunctionModel(fn, name=spec.name or "function", stream=spec.stream,
                         chunk_size=spec.chunk_size, delay=spec.delay)


class UnconfiguredModel:
    """Stands in for a provider whose credentials are missing.

    Loading a workflow must not need every agent's API key (the offline agents of the same
    file still run); a run of this agent fails at its first model step with a clear reason.
    """

    def __init__(self, name: str, reason: str) -> None:
        self._name = name
        self.reason = reason

    @property
    def name(self) -> str:
        return self._name

    async def complete(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec],
        settings: ModelSettings | None = None,
    ) -> ModelResponse:
        raise ModelError(self.reason, transient=False)


def _openai(spec: OpenAIModelSpec) -> Model:
    from ..models.openai import OpenAIModel  # the SDK's import (~0.5 s) only when one is used

    key = os.environ.get(spec.api_key_env) or None
    base_url = spec.base_url or os.environ.get("OPENAI_BASE_URL") or None
    if key is None:
        if base_url is None:
            return UnconfiguredModel(
                f"openai:{spec.model}",
                f"environment variable {spec.api_key_env} is not set (needed without base_url)",
            )
        # Pass the placeholder rather than None: OpenAIModel would otherwise fall back on
        # OPENAI_API_KEY and send the OpenAI key to a server this file named.
        key = _NO_KEY
    try:
        return OpenAIModel(
            spec.model,
            api_key=key,
            base_url=base_url,
            timeout=spec.timeout,
            settings=spec.settings,
            retry=spec.retry.to_policy() if spec.retry is not None else None,
            output_cap_param=spec.output_cap_param,
            stream=spec.stream,
        )
    except (ModelError, ValueError) as exc:
        raise SpecError((), str(exc)) from None

"""Small builders shared by tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alpaca_engine.agents import Agent
from alpaca_engine.engine import Engine
from alpaca_engine.models.base import Model
from alpaca_engine.models.scripted import ScriptedModel
from alpaca_engine.store.base import Store
from alpaca_engine.tools.base import Tool
from alpaca_engine.tools.registry import ToolRegistry
from alpaca_engine.workflow import Workflow


def workflow(model: Model | Sequence[Any], tools: Sequence[Tool], *, allow: Sequence[str] = ("*",),
             capabilities: frozenset[str] | None = None, max_steps: int = 25,
             budget: dict[str, Any] | None = None) -> Workflow:
    if not isinstance(model, Model):
        model = ScriptedModel(list(model))
    agent = Agent(name="agent", model=model, instructions="Be useful.", tools=list(allow),
                  capabilities=capabilities, max_steps=max_steps)
    return Workflow(ref="test", agents={"agent": agent}, tools=ToolRegistry(tools),
                    budget=budget or {})


def engine(store: Store, wf: Workflow, **kw: Any) -> Engine:
    return Engine(store, lambda ref: wf, **kw)

"""Alpaca Agent Engine: governed, durable, auditable AI agents."""

from .agents import Agent
from .engine import Engine
from .errors import AlpacaError, ErrorCode
from .lifecycle import RunState
from .models.base import Message, Model, ModelResponse, ToolCall, ToolSpec, Usage
from .models.function import FunctionModel
from .models.scripted import ScriptedModel
from .store.records import RunRecord, StepRecord
from .store.sqlite import SQLiteStore
from .tools.base import Tool, ToolContext
from .tools.breaker import BreakerPolicy
from .tools.decorator import tool
from .tools.registry import ToolRegistry
from .tools.retry import RetryPolicy, TransientError
from .workflow import Workflow

__all__ = [
    "Agent", "AlpacaError", "BreakerPolicy", "Engine", "ErrorCode", "FunctionModel",
    "Message", "Model", "ModelResponse", "RetryPolicy", "RunRecord", "RunState",
    "SQLiteStore", "ScriptedModel", "StepRecord", "Tool", "ToolCall", "ToolContext",
    "ToolRegistry", "ToolSpec", "TransientError", "Usage", "Workflow", "tool",
]

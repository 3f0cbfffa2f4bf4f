"""Alpaca Agent Engine: governed, durable, auditable AI agents."""

from .agents import Agent
from .engine import Engine
from .errors import AlpacaError, ErrorCode
from .lifecycle import RunState
from .models.base import (
    Message,
    Model,
    ModelDelta,
    ModelResponse,
    StreamingModel,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
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
    "Message", "Model", "ModelDelta", "ModelResponse", "RetryPolicy", "RunRecord", "RunState",
    "SQLiteStore", "ScriptedModel", "StepRecord", "StreamingModel", "Tool", "ToolCall",
    "ToolCallDelta", "ToolContext", "ToolRegistry", "ToolSpec", "TransientError", "Usage",
    "Workflow", "tool",
]

"""Alpaca Agent Engine: governed, durable, auditable AI agents."""

from .agents import Agent, HistoryPolicy
from .chat_stream import ChatDelta, ChatStep, ChatStream
from .collector import tune_collector
from .engine import Engine
from .errors import AlpacaError, ErrorCode, TurnInProgress
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
from .store.records import RunRecord, StepRecord, ThreadRecord
from .store.sqlite import SQLiteStore
from .tools.base import Tool, ToolContext
from .tools.breaker import BreakerPolicy
from .tools.decorator import tool
from .tools.registry import ToolRegistry
from .tools.retry import RetryPolicy, TransientError
from .workflow import Workflow

__all__ = [
    "Agent", "AlpacaError", "BreakerPolicy", "ChatDelta", "ChatStep", "ChatStream", "Engine",
    "ErrorCode", "FunctionModel", "HistoryPolicy", "Message", "Model", "ModelDelta",
    "ModelResponse", "RetryPolicy",
    "RunRecord", "RunState", "SQLiteStore", "ScriptedModel", "StepRecord", "StreamingModel",
    "ThreadRecord", "Tool", "ToolCall", "ToolCallDelta", "ToolContext", "ToolRegistry",
    "ToolSpec", "TransientError", "TurnInProgress", "Usage", "Workflow", "tool", "tune_collector",
]

"""Model adapters behind one protocol: scripted, openai, anthropic."""

from engine_service.models._anthropic import AnthropicModel
from engine_service.models._base import (
    ModelAdapter,
    ModelError,
    ModelRequest,
    RetryPolicy,
    TextChunk,
    ToolSpec,
    TurnResult,
)
from engine_service.models._openai import OpenAIModel
from engine_service.models._scripted import ScriptedModel

__all__ = [
    "AnthropicModel",
    "ModelAdapter",
    "ModelError",
    "ModelRequest",
    "OpenAIModel",
    "RetryPolicy",
    "ScriptedModel",
    "TextChunk",
    "ToolSpec",
    "TurnResult",
]

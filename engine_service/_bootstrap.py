"""Build an Engine from configuration (shared by the engine and runner entry points)."""

from __future__ import annotations

from engine_service._config import EngineConfig
from engine_service._engine import Engine, builtin_tools
from engine_service._storage import open_storage
from engine_service._tools import ToolRegistry, load_tool


def build_engine(config: EngineConfig) -> Engine:
    """The built-in catalogue plus custom tools by import path, over the configured storage."""
    tools = ToolRegistry(builtin_tools(config))
    for path in config.tools.custom:
        tools.register(load_tool(path))
    return Engine(config, open_storage(config.storage, fsync=config.fsync), tools=tools)

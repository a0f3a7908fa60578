"""Build an Engine from configuration (shared by the engine and runner entry points)."""

from __future__ import annotations

import importlib.util

from engine_service.core._catalogue import MCP_FEATURE, builtin_tools
from engine_service.core._config import EngineConfig
from engine_service.core._control import ControlPlane
from engine_service.core._engine import Engine
from engine_service.core._errors import missing_extra
from engine_service.core._preflight import open_configured_storage
from engine_service.tools._registry import ToolRegistry, load_tool


def build_engine(config: EngineConfig) -> Engine:
    """The built-in catalogue plus custom tools by import path, over the configured storage."""
    if config.tools.mcp_servers and importlib.util.find_spec("mcp") is None:
        raise missing_extra("mcp", "mcp", MCP_FEATURE)
    tools = ToolRegistry(builtin_tools(config))
    for path in config.tools.custom:
        tools.register(load_tool(path))
    return Engine(config, open_configured_storage(config), tools=tools, control=open_control(config))


CONTROL_FEATURE = "a PostgreSQL control plane (control_url)"


def open_control(config: EngineConfig) -> ControlPlane | None:
    """The configured control plane (not connected yet), or None for none."""
    if not config.control_url:
        return None
    try:
        from engine_service.control import PostgresControl
    except ModuleNotFoundError as exc:
        raise missing_extra("asyncpg", "postgres", CONTROL_FEATURE, exc) from None
    return PostgresControl(config.control_url, max_running=config.workspace_max_running)

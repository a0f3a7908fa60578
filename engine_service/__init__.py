"""Machina engine: the agent-loop core and the EngineService gRPC server.

Layers are folders: ``core/`` (the Engine, the run actor, the run record),
``storage/``, ``tools/``, ``net/``, ``models/`` and ``api/``, the only one that
imports grpc or generated code. The names below are the public surface; tests and
benchmarks use ``engine_service.testing``, processes that serve the engine
``engine_service.api.serving``.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("machina-engine")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

from engine_service.core._config import ConfigError, EngineConfig, load_config
from engine_service.core._engine import Engine
from engine_service.core._errors import EngineError, ErrorKind
from engine_service.core._run import ClientToolDef, Decision, RunRecord, RunSpec, ScriptedTurn
from engine_service.core._types import Principal, RunState
from engine_service.storage._local import LocalStorage, open_storage
from engine_service.storage._protocol import Storage
from engine_service.tools._registry import Tool, ToolContext, ToolError, ToolRegistry, tool

__all__ = [
    "ClientToolDef",
    "ConfigError",
    "Decision",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ErrorKind",
    "LocalStorage",
    "Principal",
    "RunRecord",
    "RunSpec",
    "RunState",
    "ScriptedTurn",
    "Storage",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "load_config",
    "open_storage",
    "tool",
]

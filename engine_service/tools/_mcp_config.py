"""MCP server configuration and per-run selection.

Kept apart from _mcp.py so that configuration (read at every start) does not
import the MCP SDK: an engine without MCP servers never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

_SERVER_NAME = r"^[A-Za-z0-9_-]{1,32}$"


class McpServerConfig(BaseModel):
    """One MCP server: a command to run over stdio, or a streamable-HTTP URL."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_SERVER_NAME, description="Tools appear as mcp__<name>__<tool>.")
    transport: Literal["stdio", "http"]
    # stdio: the server runs as our child, in its own process group, with only a minimal
    # environment (PATH, HOME, USER, ...) plus `env`: the engine's secrets never reach it.
    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = Field(default={}, repr=False)
    cwd: str | None = None
    # http: the streamable-HTTP endpoint, e.g. http://127.0.0.1:8000/mcp.
    url: str | None = None
    headers: dict[str, str] = Field(default={}, repr=False)
    # Per call; a call that takes longer is abandoned (the server is told) and reported.
    timeout_s: float = Field(30.0, gt=0)
    # Connecting, the handshake and listing the tools.
    startup_timeout_s: float = Field(20.0, gt=0)
    # MCP tool names (as the server spells them) that are safe to run again after a crash.
    idempotent_tools: list[str] = []

    @model_validator(mode="after")
    def _transport_fields(self) -> Self:
        if self.transport == "stdio":
            if not self.command:
                raise ValueError(f"MCP server {self.name!r}: transport 'stdio' needs a command")
            wrong = {"url", "headers"} & self.model_fields_set
        else:
            if not self.url:
                raise ValueError(f"MCP server {self.name!r}: transport 'http' needs a url")
            if urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).hostname:
                raise ValueError(f"MCP server {self.name!r}: url {self.url!r} must be an http(s) URL")
            wrong = {"command", "args", "env", "cwd"} & self.model_fields_set
        if wrong:
            raise ValueError(
                f"MCP server {self.name!r}: {', '.join(sorted(wrong))} do not apply to transport "
                f"{self.transport!r}"
            )
        return self

    def target(self) -> str:
        """Where the server is, for log lines (no arguments, headers or credentials)."""
        if self.transport == "stdio":
            return f"stdio: {os.path.basename(self.command or '')}"
        parts = urlsplit(self.url or "")
        return f"http: {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def mcp_tool_prefix(server: str) -> str:
    """What the names of a server's tools start with: ``mcp__<server>__``."""
    return f"mcp__{server}__"


def select_servers(
    all_configs: Sequence[McpServerConfig], names: Sequence[str] | None
) -> list[McpServerConfig]:
    """The servers a run may use: all of them for None, else the named ones (in config order)."""
    if names is None:
        return list(all_configs)
    known = {c.name for c in all_configs}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"unknown MCP server(s) {', '.join(map(repr, unknown))}; configured: "
            f"{', '.join(map(repr, sorted(known))) or 'none'}"
        )
    wanted = set(names)
    return [c for c in all_configs if c.name in wanted]

"""Built-in tools (files, Bash, WebFetch, FetchData) and MCP servers."""

from engine_service.tools._bash import bash_tool
from engine_service.tools._fetch import FETCH_DATA, result_blob_name, truncation_note
from engine_service.tools._files import EDIT, GLOB, GREP, READ, WRITE, resolve_in_workdir
from engine_service.tools._mcp_config import McpServerConfig, mcp_tool_prefix, select_servers
from engine_service.tools._sandbox import Sandbox, SandboxLimits, sweep_stale_cgroups
from engine_service.tools._sandbox import describe as describe_sandbox
from engine_service.tools._web import WebFetchPolicy, web_fetch_tool


def __getattr__(name: str) -> object:
    # McpManager imports the MCP SDK (~30 MB, ~0.3 s): only load it when it is used.
    if name == "McpManager":
        from engine_service.tools._mcp import McpManager

        return McpManager
    raise AttributeError(name)


__all__ = [
    "EDIT",
    "FETCH_DATA",
    "GLOB",
    "GREP",
    "READ",
    "WRITE",
    "McpServerConfig",
    "Sandbox",
    "SandboxLimits",
    "WebFetchPolicy",
    "bash_tool",
    "describe_sandbox",
    "mcp_tool_prefix",
    "resolve_in_workdir",
    "result_blob_name",
    "select_servers",
    "sweep_stale_cgroups",
    "truncation_note",
    "web_fetch_tool",
]

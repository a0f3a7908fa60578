"""Built-in tools (files, Bash, WebFetch, FetchData) and MCP servers."""

from engine_service.tools._bash import BASH
from engine_service.tools._fetch import FETCH_DATA, result_blob_name, truncation_note
from engine_service.tools._files import EDIT, GLOB, GREP, READ, WRITE, resolve_in_workdir
from engine_service.tools._mcp import McpManager, McpServerConfig, select_servers
from engine_service.tools._web import WebFetchPolicy, web_fetch_tool

__all__ = [
    "BASH",
    "EDIT",
    "FETCH_DATA",
    "GLOB",
    "GREP",
    "READ",
    "WRITE",
    "McpManager",
    "McpServerConfig",
    "WebFetchPolicy",
    "resolve_in_workdir",
    "result_blob_name",
    "select_servers",
    "truncation_note",
    "web_fetch_tool",
]

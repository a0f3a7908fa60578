"""A small MCP server with tools that misbehave on purpose: crash, hang, fail.

Run as ``python -m tests.mcp_servers.flaky`` (stdio) or with ``--http PORT``
(streamable HTTP on 127.0.0.1). Built on the official SDK's ``MCPServer``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("flaky")

# The smallest valid PNG: 1x1, transparent.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def pid() -> str:
    """The server's process id (tests use it to see restarts)."""
    return str(os.getpid())


@server.tool()
def crash(code: int = 3) -> str:
    """Exit the server process in the middle of the call."""
    print(f"flaky: crashing on purpose with exit code {code}", file=sys.stderr, flush=True)
    os._exit(code)


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}s"


@server.tool()
def fail(message: str) -> str:
    """Report a tool error (an isError result)."""
    raise ToolError(message)


@server.tool()
def picture() -> list[str | Image]:
    """A caption and a tiny PNG."""
    return ["a 1x1 pixel", Image(data=PNG, format="png")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT")
    args = parser.parse_args()
    if args.http is None:
        server.run()
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.http)


if __name__ == "__main__":
    main()

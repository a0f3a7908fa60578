"""MCP servers' tools in the engine's catalogue, through the official ``mcp`` SDK (2.x).

Each configured server (a stdio subprocess or a streamable-HTTP endpoint) gets one
connection, and each of its tools becomes a `Tool` named ``mcp__<server>__<tool>``.
Every run shares that connection: an MCP session answers concurrent requests.

A connection lives in a task of its own because the SDK's transports are anyio task
groups, which must be entered and left by one task, while tool calls arrive from
every run's task. A server that fails to start is logged and left out; the engine
starts anyway. A server that dies later costs the calls in flight an error result
(never a hang, never a crashed run) and is reconnected on the next call, at most once
per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TextIO

import anyio
import jsonschema
import pydantic
from mcp import Client, MCPError, StdioServerParameters
from mcp import types as mt
from mcp.client import Transport

from engine_service.core._regex import check_schema
from engine_service.core._types import JsonObject
from engine_service.tools._mcp_config import McpServerConfig, mcp_tool_prefix, select_servers
from engine_service.tools._mcp_transport import StderrTail, http_transport, stderr_pipe, stdio_transport
from engine_service.tools._registry import Tool, ToolContext, ToolError

log = logging.getLogger("machina.engine.mcp")

# What model providers accept in a tool name; other characters of an MCP tool name become "_".
_TOOL_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_TOOL_NAME = 128
_MAX_TOOL_PAGES = 100
# Beyond the per-call timeout (which the SDK starts once the request is written), how long a
# request may take to reach a wedged transport before the connection counts as broken.
_WRITE_GRACE_S = 2.0
# How long close() waits for a graceful shutdown (stdio: stdin closed, then SIGTERM, then
# SIGKILL, each bounded by the SDK) before it cancels the connection outright.
_CLOSE_GRACE_S = 10.0
# After a connection drops, how long to wait for its last words (stderr, transport error).
_SETTLE_S = 0.3


class McpManager:
    """Connections to the configured MCP servers and the tools they offer.

    Call `start` once before serving and `close` on shutdown (or use ``async with``).
    """

    def __init__(self, configs: Iterable[McpServerConfig]) -> None:
        self._configs = list(configs)
        names = [c.name for c in self._configs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"MCP server name(s) configured twice: {', '.join(map(repr, duplicates))}")
        self._servers = {c.name: _Server(c) for c in self._configs}
        self._started = False

    async def start(self) -> None:
        """Connect to every server at once; a server that fails is logged and its tools left out."""
        if self._started:
            raise RuntimeError("McpManager.start() was already called")
        self._started = True
        await asyncio.gather(*(server.start() for server in self._servers.values()))

    @property
    def startup_errors(self) -> dict[str, str]:
        """Why each server that failed to start did so, by server name."""
        return {name: s.startup_error for name, s in self._servers.items() if s.startup_error is not None}

    async def list_tools(self, servers: Sequence[str] | None = None) -> list[Tool]:
        """The tools of the servers that started (of the named ones only, if given)."""
        if not self._started:
            raise RuntimeError("call McpManager.start() before list_tools()")
        chosen = select_servers(self._configs, servers)
        return [t for c in chosen for t in self._servers[c.name].tools]

    async def close(self) -> None:
        """Close every session and stop every stdio server; idempotent."""
        await asyncio.gather(*(server.close() for server in self._servers.values()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _Unavailable(Exception):
    """A connection could not be opened; the message says why."""


class _Server:
    """One configured server: its tools and its current connection (replaced when it breaks)."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self.tools: list[Tool] = []
        self.startup_error: str | None = None
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        # Reconnect attempts so far and why the last one failed: callers that queued behind an
        # attempt share its outcome instead of each spawning a server of their own.
        self._attempts = 0
        self._last_failure = ""

    @property
    def name(self) -> str:
        return self.config.name

    async def start(self) -> None:
        try:
            conn = await _Connection.open(self.config)
        except _Unavailable as exc:
            self._fail_start(str(exc))
            return
        try:
            async with asyncio.timeout(self.config.startup_timeout_s):
                listed = await _list_all_tools(conn.client)
        except Exception as exc:  # any failure here leaves the engine running
            await conn.close()
            self._fail_start(
                f"listing its tools took longer than {self.config.startup_timeout_s:g}s"
                if isinstance(exc, TimeoutError)
                else f"listing its tools failed: {_describe(exc)}"
            )
            return
        self._conn = conn
        self.tools = self._to_tools(listed)
        log.info(
            "MCP server %r (%s) started with %d tool(s)",
            self.name,
            self.config.target(),
            len(self.tools),
            extra={"mcp_server": self.name},
        )

    def _fail_start(self, reason: str) -> None:
        self.startup_error = reason
        log.warning(
            "MCP server %r (%s) failed to start; its tools are unavailable: %s",
            self.name,
            self.config.target(),
            reason,
            extra={"mcp_server": self.name},
        )

    def _to_tools(self, listed: list[mt.Tool]) -> list[Tool]:
        tools: list[Tool] = []
        seen: set[str] = set()
        for spec in listed:
            public = mcp_tool_prefix(self.name) + _TOOL_NAME_UNSAFE.sub("_", spec.name)
            problem = None
            if public in seen:
                problem = f"its name clashes with another tool as {public!r}"
            elif len(public) > _MAX_TOOL_NAME:
                problem = f"{public!r} is longer than {_MAX_TOOL_NAME} characters"
            else:
                try:
                    check_schema(spec.input_schema)
                except jsonschema.SchemaError as exc:
                    problem = f"its input schema is invalid: {exc.message}"
            if problem:
                log.warning(
                    "MCP server %r: leaving out tool %r: %s",
                    self.name,
                    spec.name,
                    problem,
                    extra={"mcp_server": self.name},
                )
                continue
            seen.add(public)
            tools.append(
                Tool(
                    name=public,
                    description=spec.description or f"The {spec.name} tool of the {self.name} MCP server.",
                    input_schema=dict(spec.input_schema),
                    handler=self._handler(spec.name),
                    capabilities=frozenset({"subprocess"} if self.config.transport == "stdio" else ()),
                    idempotent=spec.name in self.config.idempotent_tools,
                )
            )
        return tools

    def _handler(self, remote_name: str) -> Callable[[JsonObject, ToolContext], Awaitable[str]]:
        async def call(arguments: JsonObject, ctx: ToolContext) -> str:
            return await self.call(remote_name, arguments)

        return call

    async def call(self, tool: str, arguments: JsonObject) -> str:
        conn = await self._connection()
        timeout = self.config.timeout_s
        timed_out = ToolError(f"MCP tool {tool!r} on server {self.name!r} timed out after {timeout:g}s")
        try:
            async with asyncio.timeout(timeout + _WRITE_GRACE_S):
                result = await conn.client.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except TimeoutError:
            # The SDK's own clock did not fire, so the request never got through: the
            # transport is wedged and the next call should start afresh.
            conn.broken = f"a request to it got stuck for {timeout + _WRITE_GRACE_S:g}s"
            raise timed_out from None
        except MCPError as exc:
            if exc.code == mt.REQUEST_TIMEOUT:
                raise timed_out from None
            if exc.code == mt.CONNECTION_CLOSED:
                reason = (
                    "the engine is shutting down"
                    if self._closed
                    else await conn.lost("the connection closed")
                )
                raise ToolError(f"MCP server {self.name!r} is not available: {reason}") from None
            raise ToolError(
                f"MCP server {self.name!r} refused the call to {tool!r}: {exc.message} (code {exc.code})"
            ) from None
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            reason = await conn.lost("the connection closed")
            raise ToolError(f"MCP server {self.name!r} is not available: {reason}") from None
        except pydantic.ValidationError as exc:
            raise ToolError(
                f"MCP server {self.name!r} sent an invalid result for {tool!r}: "
                f"{exc.error_count()} validation error(s)"
            ) from None
        text = render_content(result)
        if result.is_error:
            raise ToolError(text or f"MCP tool {tool!r} on server {self.name!r} reported an error")
        return text

    async def _connection(self) -> _Connection:
        """The live connection, reconnecting once if it broke."""
        conn = self._conn
        if conn is not None and conn.usable():
            return conn
        attempts = self._attempts
        async with self._lock:
            conn = self._conn
            if self._closed:
                raise ToolError(f"MCP server {self.name!r} is not available: the engine is shutting down")
            if conn is not None and conn.usable():
                return conn
            if self._attempts != attempts:
                # Someone else's reconnect failed while this call waited for it.
                raise ToolError(f"MCP server {self.name!r} is not available: {self._last_failure}")
            self._attempts += 1
            self._conn = None
            if conn is not None:
                log.warning(
                    "MCP server %r broke (%s); reconnecting",
                    self.name,
                    conn.broken or "the connection closed",
                    extra={"mcp_server": self.name},
                )
                await conn.close()
            try:
                self._conn = await _Connection.open(self.config)
            except _Unavailable as exc:
                self._last_failure = str(exc)
                log.warning(
                    "MCP server %r could not be reconnected: %s",
                    self.name,
                    exc,
                    extra={"mcp_server": self.name},
                )
                raise ToolError(f"MCP server {self.name!r} is not available: {exc}") from None
            log.info("MCP server %r reconnected", self.name, extra={"mcp_server": self.name})
            return self._conn

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()


class _Connection:
    """One session with one server, held open by its own task until `close`."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self.broken: str | None = None
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._stop = asyncio.Event()
        self._failure: str | None = None
        self._stderr: StderrTail | None = None
        self._stderr_transport: asyncio.ReadTransport | None = None
        self._errlog: TextIO | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("MCP connection is not open")
        return self._client

    @classmethod
    async def open(cls, config: McpServerConfig) -> _Connection:
        conn = cls(config)
        try:
            await conn._open()
        except BaseException:
            await asyncio.shield(conn.close())
            raise
        return conn

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._task = asyncio.create_task(self._hold(ready), name=f"mcp-server-{self.config.name}")
        done, _ = await asyncio.wait(
            {ready, self._task}, timeout=self.config.startup_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if ready in done and self.usable():
            return
        if not done:
            reason = f"it did not start within {self.config.startup_timeout_s:g}s"
        else:
            await self._settle(task=True)
            reason = self._failure or "it closed the connection during the handshake"
        ready.cancel()
        raise _Unavailable(self._with_stderr(reason))

    async def _hold(self, ready: asyncio.Future[None]) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                async with Client(
                    await self._transport(), client_info=mt.Implementation(name="machina", version=_VERSION)
                ) as client:
                    self._client = client
                    ready.set_result(None)
                    await self._stop.wait()
        except Exception as exc:  # the transport's failure is this connection's end, reported to callers
            self._failure = _describe(exc)
            if ready.done():
                log.warning(
                    "MCP server %r: connection lost: %s",
                    self.config.name,
                    self._failure,
                    extra={"mcp_server": self.config.name},
                )
        finally:
            self._failure = self._failure or "the connection closed"

    async def _transport(self) -> Transport:
        config = self.config
        if config.transport == "http":
            assert config.url is not None
            return http_transport(config.url, config.headers)
        assert config.command is not None
        params = StdioServerParameters(
            command=config.command, args=config.args, env=config.env or None, cwd=config.cwd
        )
        errlog, reader = stderr_pipe()
        self._errlog = errlog
        tail = StderrTail(config.name)
        try:
            self._stderr_transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: tail, reader
            )
        except BaseException:
            errlog.close()
            reader.close()
            raise
        self._stderr = tail
        return stdio_transport(params, errlog)

    def usable(self) -> bool:
        return (
            self.broken is None
            and self._client is not None
            and self._task is not None
            and not self._task.done()
            and not _transport_closed(self._client)
        )

    async def lost(self, default: str) -> str:
        """Mark the connection broken after a call saw it close; returns the best reason known."""
        if self.broken is None:
            # A stdio server's task lives on until close(); an HTTP one ends with the error.
            await self._settle(task=self._stderr is None)
            failure = self._failure if self._task is not None and self._task.done() else None
            self.broken = self._with_stderr(failure or default)
        return self.broken

    async def _settle(self, *, task: bool) -> None:
        """Give a dropped connection a moment for its last words: the transport's error, stderr."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_SETTLE_S):
                if task and self._task is not None:
                    await asyncio.wait({self._task})
                if self._stderr is not None:
                    await self._stderr.closed.wait()

    def _with_stderr(self, reason: str) -> str:
        tail = self._stderr.tail() if self._stderr is not None else ""
        return f"{reason}; its stderr ended with: {tail}" if tail else reason

    async def close(self) -> None:
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            if self._client is None:
                # Still starting: nothing to wind down gracefully, stop it now.
                self._abort(task)
            done, _ = await asyncio.wait({task}, timeout=_CLOSE_GRACE_S)
            if not done:
                self._abort(task)
                await asyncio.wait({task})
        if self._errlog is not None:
            self._errlog.close()  # normally closed as soon as the child is spawned
        if self._stderr_transport is not None:
            self._stderr_transport.close()
            self._stderr_transport = None

    def _abort(self, task: asyncio.Task[None]) -> None:
        # The anyio scope, not task.cancel(): the SDK shields its stdio shutdown (which kills
        # the process tree) from anyio cancellation only.
        if self._scope is not None:
            self._scope.cancel()
        else:
            task.cancel()


async def _list_all_tools(client: Client) -> list[mt.Tool]:
    tools: list[mt.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def render_content(result: mt.CallToolResult) -> str:
    """A tool result as text for the model: text parts joined, other content summarised."""
    parts = [_render_block(block) for block in result.content]
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(parts)


def _render_block(block: Any) -> str:
    if isinstance(block, mt.TextContent):
        return block.text
    if isinstance(block, mt.ImageContent | mt.AudioContent):
        return f"[{block.type}: {block.mime_type}, {_base64_size(block.data)} bytes]"
    if isinstance(block, mt.ResourceLink):
        return f"[resource link: {block.name} <{block.uri}>]"
    if isinstance(block, mt.EmbeddedResource):
        res = block.resource
        if isinstance(res, mt.TextResourceContents):
            return f"[resource: {res.uri}]\n{res.text}"
        mime = res.mime_type or "application/octet-stream"
        return f"[resource: {res.uri}, {mime}, {_base64_size(res.blob)} bytes]"
    return f"[{getattr(block, 'type', type(block).__name__)} content]"


def _base64_size(data: str) -> int:
    """Decoded size of base64 text, without decoding it."""
    return len(data.rstrip("=")) * 3 // 4


def _describe(exc: BaseException) -> str:
    """A one-line account of a failure, looking inside the task groups' exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [
            _describe(e) for e in exc.exceptions if not isinstance(e, asyncio.CancelledError | GeneratorExit)
        ]
        return "; ".join(dict.fromkeys(leaves)) or "cancelled"
    if isinstance(exc, MCPError):
        if exc.code == mt.CONNECTION_CLOSED:
            return "the connection closed"
        return f"{exc.message} (code {exc.code})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _transport_closed(client: Client) -> bool:
    # The SDK has no public "connection lost" signal, so peek at its dispatcher's flag: a
    # server that died between calls is then replaced before the next call rather than
    # costing that call an error. Without the attribute this degrades to the latter.
    try:
        dispatcher = getattr(client.session, "_dispatcher", None)
    except RuntimeError:
        return True
    return getattr(dispatcher, "_closed", False) is True


def _version() -> str:
    try:
        return importlib.metadata.version("machina")
    except importlib.metadata.PackageNotFoundError:
        return "0"


_VERSION = _version()

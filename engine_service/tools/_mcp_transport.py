"""How the engine reaches an MCP server: stdio (with a bounded tail of its stderr) or streamable
HTTP, with lone surrogates in a server's JSON repaired before the SDK parses it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, BinaryIO, Self, TextIO

import pydantic
from mcp import StdioServerParameters, stdio_client
from mcp import types as mt

# The two private modules hold names the SDK has no public home for yet: the stream pair a
# transport yields, and the HTTP client factory with the SDK's recommended MCP timeouts (which
# its own ClientSessionGroup imports from there too).
from mcp.client._transport import ReadStream, TransportStreams
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.message import SessionMessage

from engine_service.core._text import loads_untrusted

log = logging.getLogger("machina.engine.mcp")

_STDERR_LINES = 20
_STDERR_LINE_CHARS = 500


def stderr_pipe() -> tuple[TextIO, BinaryIO]:
    """A pipe for a stdio server's stderr: (write end for the child, read end for us)."""
    read_fd, write_fd = os.pipe()
    return open(write_fd, "w", encoding="utf-8", errors="replace"), open(read_fd, "rb", buffering=0)


@asynccontextmanager
async def stdio_transport(params: StdioServerParameters, errlog: TextIO) -> AsyncIterator[TransportStreams]:
    try:
        async with stdio_client(params, errlog=errlog) as (read, write):
            # The child has its own copy now; ours would keep the pipe open past the child's exit.
            errlog.close()
            yield SurrogateRepair(read), write
    finally:
        errlog.close()


@asynccontextmanager
async def http_transport(url: str, headers: dict[str, str]) -> AsyncIterator[TransportStreams]:
    async with (
        create_mcp_http_client(headers=headers or None) as http,
        streamable_http_client(url, http_client=http) as (read, write),
    ):
        # The HTTP transport answers a request whose reply it cannot parse with an error of
        # its own, so a lone surrogate there costs the call an error result; the repair
        # only reaches messages it hands over unparsed (server-initiated ones).
        yield SurrogateRepair(read), write


class SurrogateRepair:
    """A transport's read stream, with the messages its JSON parser refused for a lone surrogate.

    The SDK parses with pydantic, which refuses a JSON string holding a lone UTF-16
    surrogate escape ("\\ud83d", say half an emoji) and hands the stdio session the parse
    error instead of the message: the call it answers would then wait for its timeout.
    Such a message is parsed again here with those surrogates as U+FFFD.
    """

    def __init__(self, inner: ReadStream[SessionMessage | Exception]) -> None:
        self._inner = inner

    @property
    def last_context(self) -> Any:
        # The dispatcher runs each message in its sender's context, read from here if present.
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        return _reparse(await self._inner.receive())

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        return _reparse(await self._inner.__anext__())

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._inner.__aexit__(exc_type, exc, tb)


def _reparse(item: SessionMessage | Exception) -> SessionMessage | Exception:
    """The message a JSON parse error stands for, if only lone surrogates made it fail."""
    if not isinstance(item, pydantic.ValidationError):
        return item
    errors = item.errors(include_url=False)
    raw = errors[0].get("input") if len(errors) == 1 and errors[0]["type"] == "json_invalid" else None
    if not isinstance(raw, str) or "\\u" not in raw:
        return item
    try:
        # json.loads reads what pydantic refused; the repaired message then takes the SDK's path.
        text = json.dumps(loads_untrusted(raw), ensure_ascii=False, allow_nan=False)
        return SessionMessage(mt.jsonrpc_message_adapter.validate_json(text, by_name=False))
    except ValueError:  # pydantic's ValidationError is one
        return item


class StderrTail(asyncio.Protocol):
    """Logs a stdio server's stderr at debug level and keeps its last lines for error messages."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.lines: deque[str] = deque(maxlen=_STDERR_LINES)
        self.closed = asyncio.Event()
        self._partial = b""

    def data_received(self, data: bytes) -> None:
        *complete, partial = (self._partial + data).split(b"\n")
        # A server that never ends its line must not grow this buffer without bound.
        self._partial = partial[-4 * _STDERR_LINE_CHARS :]
        for raw in complete:
            self._line(raw)

    def connection_lost(self, exc: Exception | None) -> None:
        self._line(self._partial)
        self._partial = b""
        self.closed.set()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if text:
            self.lines.append(text[:_STDERR_LINE_CHARS])
            log.debug("MCP server %r stderr: %s", self.server, text, extra={"mcp_server": self.server})

    def tail(self, count: int = 3) -> str:
        return " | ".join(list(self.lines)[-count:])

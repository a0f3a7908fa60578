"""A real loopback HTTP server for model-adapter tests.

It records every request (method, path, headers, JSON body) and answers with
the next scripted response: an SSE stream written frame by frame, or a plain
status + JSON body. It runs uvicorn in its own thread and event loop, so the
adapter under test talks to it over a genuine TCP connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Sse:
    """A streamed 200 response. Frames are written verbatim, so a frame may be half an event."""

    frames: list[str]
    delay: float = 0.0  # seconds before each frame after the first
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    """A non-streamed response, typically an error."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def data(payload: Any) -> str:
    """An unnamed SSE event (OpenAI style); strings are sent as is, e.g. ``[DONE]``."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n"


def event(name: str, payload: Any) -> str:
    """A named SSE event (Anthropic style)."""
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"


class ScriptedServer:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._script: list[Sse | Reply] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="off", ws="none", http="h11"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push(self, *responses: Sse | Reply) -> None:
        self._script.extend(responses)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        self.requests.append(Recorded(request.method, request.url.path, dict(request.headers), body))
        if not self._script:
            return JSONResponse({"error": {"message": "the test script is exhausted"}}, status_code=418)
        response = self._script.pop(0)
        if isinstance(response, Reply):
            return JSONResponse(response.body, status_code=response.status, headers=response.headers)
        return StreamingResponse(_frames(response), media_type="text/event-stream", headers=response.headers)


async def _frames(response: Sse) -> AsyncIterator[str]:
    for i, frame in enumerate(response.frames):
        if i and response.delay:
            await asyncio.sleep(response.delay)
        yield frame


@contextmanager
def serve() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def closed_port_url() -> str:
    """A loopback URL nobody listens on, for connection-refused tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeSleep:
    """A RetryPolicy ``sleep`` that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)

"""A real loopback HTTP server for model-adapter tests.

It records every request (method, path, headers, JSON body) and answers with
the next scripted response: an SSE stream written frame by frame, or a plain
status + JSON body. It runs uvicorn in its own thread and event loop, so the
adapter under test talks to it over a genuine TCP connection.

Plus the helpers the adapter tests share: a model factory, a request, stream collectors, and
the checks on a ModelError.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine_service.core._types import Message
from engine_service.models import ModelAdapter, ModelError, ModelRequest, RetryPolicy, TextChunk, TurnResult
from tests.processes import free_port

M = TypeVar("M", bound=ModelAdapter)


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
    return f"http://127.0.0.1:{free_port()}"


class FakeSleep:
    """A RetryPolicy ``sleep`` that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# -- shared by the model-adapter tests ------------------------------------------------------------


@asynccontextmanager
async def model_factory(
    adapter: Callable[..., M], key: str, model: str, base_url: str
) -> AsyncIterator[Callable[..., M]]:
    """``build(**options)`` makes ``adapter(key, model, ...)`` talking to ``base_url`` with three
    attempts and no real waits (both overridable); every model built is closed on exit."""
    models: list[M] = []

    def build(**options: Any) -> M:
        options.setdefault("base_url", base_url)
        options.setdefault("retry", RetryPolicy(max_attempts=3, sleep=FakeSleep()))
        built = adapter(key, model, **options)
        models.append(built)
        return built

    try:
        yield build
    finally:
        for built in models:
            await built.aclose()


def request(**fields: Any) -> ModelRequest:
    fields.setdefault("system", "")
    fields.setdefault("messages", [Message("user", "Hi")])
    fields.setdefault("tools", [])
    return ModelRequest(**fields)


async def collect(model: ModelAdapter, req: ModelRequest | None = None) -> list[TextChunk | TurnResult]:
    return [item async for item in model.stream(req or request())]


async def drain(model: ModelAdapter, req: ModelRequest, into: list[TextChunk | TurnResult]) -> None:
    """Like collect, but the items seen before a failure stay visible to the test."""
    async for item in model.stream(req):
        into.append(item)


async def failure(run: Awaitable[object]) -> ModelError:
    with pytest.raises(ModelError) as caught:
        await run
    return caught.value


def assert_no_key(error: ModelError, key: str) -> None:
    rendered = [str(error), repr(error), error.message, "".join(traceback.format_exception(error))]
    assert all(key not in text for text in rendered), rendered
    # Not chained to an httpx error, whose request would still hold the auth header.
    assert error.__cause__ is None
    assert not isinstance(error.__context__, httpx.HTTPError)

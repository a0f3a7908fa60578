"""A real S3-compatible server process (moto's, from engine_service.testing) and a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from engine_service.testing import CREDENTIALS, new_bucket, running_moto

_S3_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}


__all__ = ["CREDENTIALS", "FaultyProxy", "new_bucket", "running_moto"]

T = TypeVar("T")


class FaultyProxy:
    """An HTTP proxy to the S3 server that injects faults in a repeating pattern.

    Faults: ``500`` / ``503`` (an S3 error document), ``slow`` (answer after
    ``delay`` seconds, past the client's timeout; the request still reaches the
    server), ``drop`` (forward, so the write lands, then cut the connection
    without answering).
    """

    def __init__(self, upstream: str, pattern: Iterable[str], delay: float = 2.0) -> None:
        self.upstream = upstream
        self._pattern = itertools.cycle(list(pattern))
        self.delay = delay
        self.counts: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def set_pattern(self, pattern: Iterable[str]) -> None:
        """From the next request on, inject faults in this pattern instead (e.g. an outage)."""
        self._pattern = itertools.cycle(list(pattern))

    async def start(self) -> None:
        """Serve from a thread of its own, on its own event loop.

        Tests start engines with blocking calls (``EngineProcess`` waits for the engine to
        serve, and the engine first checks its storage through this proxy): a proxy on the
        test's own loop would not answer until that check had timed out.
        """
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="faulty-s3-proxy", daemon=True)
        self._thread.start()
        await self._on_proxy_loop(self._serve())

    async def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        try:
            await self._on_proxy_loop(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)
            self._loop.close()
            self._loop = self._thread = None

    async def _on_proxy_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            body = await upstream.read()
            keep = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding")
            }
            return web.Response(status=upstream.status, body=body, headers=keep)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = next(self._pattern)
        self.counts[fault] = self.counts.get(fault, 0) + 1
        if fault in _S3_ERRORS:
            status, code, message = _S3_ERRORS[fault]
            xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return web.Response(status=status, body=xml.encode(), content_type="application/xml")
        if fault == "slow":
            response = await self._forward(request)
            await asyncio.sleep(self.delay)
            return response
        if fault == "drop":
            await self._forward(request)
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError  # the client sees the connection cut
        return await self._forward(request)

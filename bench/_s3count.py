"""A counting HTTP proxy to an S3 server: which requests an engine makes, by kind and object.

Serves from a thread of its own, on its own event loop (an engine process talks to it while
the bench's loop waits on gRPC). ``snapshot()`` returns the counts so far; subtracting two
snapshots gives what happened between them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

_RUN_PARTS = ("events", "transcript", "blobs", "commits")


def classify(method: str, path: str, query: str) -> str:
    """``PUT state``, ``GET lease``, ``LIST events``, … from a request to ``/bucket/key``."""
    if method == "GET" and ("list-type" in query or "delimiter" in query or "prefix" in query):
        verb = "LIST"
    elif method == "POST" and "delete" in query:
        verb = "DELETE"
    else:
        verb = method
    parts = path.strip("/").split("/")
    what = "other"
    if "runs" in parts:
        rest = parts[parts.index("runs") + 2 :]
        if rest:
            head = rest[0]
            what = head if head in _RUN_PARTS else head.removesuffix(".json")
            if head == "blobs" and len(rest) > 1:
                name = rest[1]
                what = "blob " + (
                    "wd" if name.startswith("wd-") else "wdm" if name.startswith("wdm-") else name
                )
        else:
            what = "runs"
    elif "requests" in parts:
        what = "request key"
    elif "shared" in parts:
        what = "shared"
    return f"{verb} {what}"


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.url = ""
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    async def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="s3-counting-proxy", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._serve(), loop))

    async def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), self._loop))
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)
        self._loop.close()
        self._loop = self._thread = None

    async def _serve(self) -> None:
        app = web.Application(client_max_size=1 << 30)
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

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        with self._lock:
            self._counts[classify(request.method, request.path, request.query_string)] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as upstream:
            body = await upstream.read()
            keep: dict[str, Any] = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding")
            }
            return web.Response(status=upstream.status, body=body, headers=keep)

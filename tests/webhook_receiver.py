"""A real local webhook receiver for the webhook tests, and the signature check."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def signed(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Whether ``headers`` (lower-cased) carry a valid ``X-Machina-Signature`` of ``body`` by ``secret``."""
    mac = hmac.new(secret.encode(), headers["x-machina-timestamp"].encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(headers["x-machina-signature"], f"sha256={mac.hexdigest()}")


class Receiver:
    """A webhook receiver on ``port`` (0: any free one; a fixed one lets a test start it late)
    answering ``statuses`` in turn (then the last one forever)."""

    def __init__(self, port: int = 0, statuses: tuple[int, ...] = (200,)) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(statuses[min(len(receiver.requests), len(statuses)) - 1])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    async def wait_for(self, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(self.requests) >= count, (
            f"{len(self.requests)} of {count} webhook requests arrived within {timeout} s: {self.requests}"
        )

"""Real HTTP servers for the ApiCall tests.

`running_httpbin()` serves the third-party `httpbin` app under gunicorn in a subprocess on a free
loopback port; `Recorder` is a tiny server on another port (so another origin) that records every
request it receives, to prove that credentials were never sent to it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx


@contextmanager
def running_httpbin(timeout: float = 30.0) -> Iterator[str]:
    """Yield httpbin's base URL; gunicorn binds port 0 and logs the port it got."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "gunicorn.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--bind=127.0.0.1:0",
                    "--worker-class=gthread",
                    "--workers=1",
                    "--threads=16",
                    "--no-control-socket",
                    "--log-level=info",
                    "httpbin:app",
                ],
                stdout=sink,
                stderr=sink,
                cwd=tmp,
            )
        try:
            yield _wait_ready(proc, log, timeout)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited early:\n{log.read_text(errors='replace')}")
        found = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            try:
                if httpx.get(found.group(1) + "/get", timeout=2).status_code == 200:
                    return found.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"httpbin did not start in {timeout}s:\n{log.read_text(errors='replace')}")


class Recorder:
    """A loopback server (its own origin) that answers 200 and records each request's headers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.bodies: list[bytes] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                recorder.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                length = int(self.headers.get("content-length") or 0)
                if length:
                    recorder.bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

"""The server under the HTTP shim: uvicorn's h11 protocol with request deadlines and a connection cap.

uvicorn has no request-header or body timeout (``timeout_keep_alive`` only runs between requests) and
its ``limit_concurrency`` counts every open socket, so clients that sent a request slowly, or never,
held the shim's sockets for good and, past the limit, got /health and /continue answered 503 for
everyone (slowloris). This protocol adds what Go's net/http (ReadHeaderTimeout) and Node's http
server (headersTimeout, requestTimeout) have:

- a connection must deliver a complete request head within ``header_timeout`` of connecting (or of
  the first byte of its next request on a kept-alive connection), and then the whole body within
  ``body_timeout``; otherwise it is aborted. No deadline runs while the application has the request:
  nothing is awaited from the client then.
- at most ``max_connections`` are open. When a new one would exceed that, the connection that has
  been idle (no request in progress) the longest is aborted to make room, so a flood of idle or
  half-sent sockets cannot lock out a client that sends its request at once, and the process keeps
  its file descriptors for gRPC and storage. Only when every connection has a request in progress
  is the new one refused.

Aborted, not closed: on TLS a graceful close waits up to 30 s for the peer's close_notify, which a
slowloris client never sends. The TLS handshake comes before the protocol sees the connection and
keeps asyncio's own 60 s limit (uvicorn has no setting for it).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from runner_service._config import RunnerConfig


def deadline_protocol(header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol subclass with these limits, keeping its own books (one class per server)."""
    open_connections: set[DeadlineProtocol] = set()
    # The open connections without a request in progress, longest idle first: dropped to make room.
    idle: dict[DeadlineProtocol, None] = {}

    class DeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _deadline_for: Literal["head", "body"] | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(open_connections) >= max_connections:
                victim = next(iter(idle), None)
                if victim is None:  # every connection has a request in progress: refuse this one
                    self.transport.abort()
                    return
                victim.drop()
            open_connections.add(self)
            self._track()

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._track()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._track()

        def drop(self) -> None:
            """Abort the connection now (a deadline passed, or room is needed)."""
            # Forgotten at once: the transport reports the loss only on a later loop iteration.
            self._forget()
            self.transport.abort()

        def _track(self) -> None:
            """Update the deadline and the idle list after the connection's state may have changed."""
            if self not in open_connections:
                return
            has_request = self.cycle is not None and not self.cycle.response_complete
            if has_request:
                idle.pop(self, None)
            else:
                idle.setdefault(self, None)  # kept in place, or the newest if it just became idle
            state = self.conn.their_state
            if state is h11.IDLE:
                if self.timeout_keep_alive_task is not None:
                    self._disarm()  # idle between requests: uvicorn's keep-alive timeout runs
                else:
                    # Waiting for a head: a new connection's, or the next one once its first bytes
                    # stopped the keep-alive timeout.
                    self._arm("head", header_timeout)
            elif state is h11.SEND_BODY:
                self._arm("body", body_timeout)
            else:  # the whole request is in, or the connection is done: nothing to wait for
                self._disarm()

        def _arm(self, phase: Literal["head", "body"], seconds: float) -> None:
            if self._deadline_for != phase:  # each phase's deadline is set once, when it starts
                self._disarm()
                self._deadline_for = phase
                self._deadline = self.loop.call_later(seconds, self.drop)

        def _disarm(self) -> None:
            self._deadline_for = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _forget(self) -> None:
            self._disarm()
            idle.pop(self, None)
            open_connections.discard(self)

    return DeadlineProtocol


def build_http_server(app: ASGIApp, config: RunnerConfig) -> uvicorn.Server:
    """The shim's server on ``config.runner_http_listen``, over TLS when the runner has a certificate."""
    host, _, port = config.runner_http_listen.rpartition(":")
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=int(port),
            http=deadline_protocol(
                config.runner_http_header_timeout_s,
                config.runner_http_body_timeout_s,
                config.runner_http_max_connections,
            ),
            # The shim has no WebSocket route, and an upgraded socket would leave the deadlines behind.
            ws="none",
            log_config=None,
            access_log=False,
            timeout_keep_alive=5,
            # uvicorn's limit counts idle and half-sent sockets too (that made the slowloris 503s);
            # max_connections above bounds the sockets, and so the requests in flight, instead.
            limit_concurrency=None,
            lifespan="off",
            # The same certificate as gRPC; uvicorn loads the files itself.
            ssl_certfile=config.runner_tls_cert or None,
            ssl_keyfile=config.runner_tls_key or None,
        )
    )

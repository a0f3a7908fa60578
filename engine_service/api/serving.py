"""Serving helpers shared by the engine's and the runner's processes.

Registering a service whose handlers parse requests themselves (a malformed request is
INVALID_ARGUMENT with ErrorInfo), health and reflection, the port file, waiting for a stop
signal and the graceful stop; and what a process hosting an engine needs from the core to
build one from its settings and check requests at its own door. ``runner_service`` imports
the engine through this module and ``engine_service``, never through a private module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine_service.api._auth import log_refused
from engine_service.api._errors import error_status, set_error
from engine_service.api._tracing import traced_stream, traced_unary
from engine_service.core import _metrics as metrics
from engine_service.core import _telemetry as telemetry
from engine_service.core._bootstrap import build_engine
from engine_service.core._config import ConfigError, check_address, is_loopback, load_config, read_tls_files
from engine_service.core._errors import EngineError, shown
from engine_service.core._ids import is_valid_id
from engine_service.core._limits import MAX_DEPTH, too_deep
from engine_service.core._logging import setup_logging
from engine_service.core._preflight import (
    STORAGE_CHECK_TIMEOUT_S,
    check_model_key,
    check_storage,
    storage_problem,
)
from engine_service.storage._protocol import Storage

__all__ = [
    "MAX_DEPTH",
    "SANDBOX_HEALTH_PREFIX",
    "ConfigError",
    "add_service",
    "build_engine",
    "check_address",
    "check_model_key",
    "check_storage",
    "error_status",
    "is_loopback",
    "is_valid_id",
    "load_config",
    "log_refused",
    "metrics",
    "read_tls_files",
    "serve_with_health",
    "set_error",
    "setup_logging",
    "start_observability",
    "stop_gracefully",
    "telemetry",
    "too_deep",
    "wait_for_stop_signal",
    "watch_storage_health",
    "write_port_file",
]

log = logging.getLogger("machina.engine")

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpc ships no types)


def _malformed(request_type: Any, exc: Exception) -> EngineError:
    return EngineError(
        "ERR_INVALID_REQUEST",
        f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {shown(exc, 200)}",
        metadata={"field": "request", "message_type": request_type.DESCRIPTOR.full_name},
    )


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register ``servicer`` for ``service`` as the generated ``add_*_to_server`` would, except
    that the handlers parse the requests.

    The generated registration lets grpc parse each request before the servicer runs, and grpc
    answers bytes that do not parse (truncated, bad UTF-8, nested too deep) UNKNOWN without
    ErrorInfo. Here they get INVALID_ARGUMENT with ErrorInfo like every other bad request; valid
    requests pay one more call.
    """
    handlers = _method_handlers(service, servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _method_handlers(service: ServiceDescriptor, servicer: object) -> dict[str, grpc.RpcMethodHandler]:
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        assert not method.client_streaming, method.full_name
        request_type = message_factory.GetMessageClass(method.input_type)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        impl = getattr(servicer, method.name)
        traced = telemetry.enabled()  # off: no wrapper at all
        if method.server_streaming:
            stream = _parsing_stream(impl, request_type)
            if traced:
                stream = traced_stream(service.full_name, method.name, stream)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=serialize
            )
        else:
            unary = _parsing_unary(impl, request_type)
            if traced:
                unary = traced_unary(service.full_name, method.name, unary)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    return handlers


def _parsing_unary(
    impl: Callable[[Any, Context], Awaitable[Any]], request_type: Any
) -> Callable[[bytes, Context], Awaitable[Any]]:
    parse = request_type.FromString

    async def handler(raw: bytes, context: Context) -> Any:
        try:
            request = parse(raw)
        except _DECODE_ERRORS as exc:
            set_error(context, _malformed(request_type, exc))
            return None
        return await impl(request, context)

    return handler


def _parsing_stream(
    impl: Callable[[Any, Context], AsyncGenerator[Any, None]], request_type: Any
) -> Callable[[bytes, Context], AsyncGenerator[Any, None]]:
    parse = request_type.FromString

    async def handler(raw: bytes, context: Context) -> AsyncGenerator[Any, None]:
        try:
            request = parse(raw)
        except _DECODE_ERRORS as exc:
            set_error(context, _malformed(request_type, exc))
            return
        async with aclosing(impl(request, context)) as responses:
            async for response in responses:
                yield response

    return handler


async def stop_gracefully(
    server: grpc.aio.Server, health_servicer: Any, close: Callable[[float], Awaitable[None]], grace: float
) -> None:
    """NOT_SERVING first, then drain RPCs while ``close(grace)`` drains the work behind them."""
    await health_servicer.enter_graceful_shutdown()
    stopping = asyncio.ensure_future(server.stop(grace))
    await close(grace)
    await stopping


# The health service also answers for ``machina.sandbox.<status>`` (bubblewrap, none, unavailable,
# off): a client or a probe can Check it to learn how run processes are confined.
SANDBOX_HEALTH_PREFIX = "machina.sandbox."


async def serve_with_health(
    server: grpc.aio.Server,
    service_name: str,
    listen: str,
    tls: tuple[bytes, bytes] | None,
    sandbox_status: str = "",
    listen_setting: str = "MACHINA_LISTEN (--listen)",
    reuse_port: bool = False,
) -> tuple[int, Any]:
    """Add health and reflection to ``server``, bind ``listen`` and start; returns (port, health servicer).

    ``tls`` is (PEM private key, PEM certificate chain); None serves plaintext. Once started, the
    server and ``service_name`` report SERVING, and so does ``machina.sandbox.<sandbox_status>``.
    """
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    _check_can_bind(listen, listen_setting, reuse_port)
    try:
        if tls is not None:
            port = server.add_secure_port(listen, grpc.ssl_server_credentials([tls]))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:
        raise _cannot_listen(listen, listen_setting, "in use, or not an address of this machine") from None
    await server.start()
    names = ["", service_name] + ([SANDBOX_HEALTH_PREFIX + sandbox_status] if sandbox_status else [])
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return port, health_servicer


_DECODE_ERRORS = (protobuf_message.Error, ValueError, RecursionError)


def _cannot_listen(listen: str, setting: str, why: str) -> ConfigError:
    return ConfigError(
        f"cannot listen on {listen} ({why}): set {setting} to a free HOST:PORT (port 0 picks one)"
    )


def _check_can_bind(listen: str, setting: str, reuse_port: bool = False) -> None:
    """Bind ``listen`` once as grpc will (SO_REUSEADDR, and SO_REUSEPORT with ``reuse_port``), so
    a port in use is one clear line before grpc's own multi-line log of the failure."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0 or host in ("", "0.0.0.0", "::", "*"):  # noqa: S104
        return
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return  # grpc reports a name it cannot resolve
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Shared with the other processes serving this port, which bound it the same way.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise _cannot_listen(listen, setting, exc.strerror or "cannot bind") from None


async def watch_storage_health(
    health_servicer: Any,
    names: Sequence[str],
    storage: Storage,
    interval: float = 10.0,
    control: Callable[[], str] | None = None,
) -> None:
    """Report ``names`` NOT_SERVING while ``storage`` does not answer a cheap listing, SERVING
    again once it does (one listing every ``interval`` seconds; run as a task, cancel to stop).

    ``control`` (the control plane's ``available``) is looked at every second too: "" while
    it answers, else why not."""
    serving = True
    tick = min(interval, 1.0) if control is not None else interval
    storage_issue, next_probe = "", time.monotonic() + interval
    while True:
        await asyncio.sleep(tick)
        if time.monotonic() >= next_probe:
            storage_issue = await storage_problem(storage, min(interval, STORAGE_CHECK_TIMEOUT_S))
            next_probe = time.monotonic() + interval
        control_issue = control() if control is not None else ""
        problem = storage_issue or (control_issue and f"control plane: {control_issue}")
        if bool(problem) == serving:
            serving = not problem
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in names:
                await health_servicer.set(name, status)
            if serving:
                log.warning("storage and control plane reachable again: health SERVING")
            else:
                log.warning("unreachable (%s): health NOT_SERVING", problem)


def start_observability(config: Any, service_name: str) -> int:
    """Tracing and OTLP metrics from the OTEL_* variables, and the Prometheus endpoint when
    ``config.metrics_listen`` is set; returns its port (0 = not served). ConfigError in one line."""
    try:
        telemetry.configure(service_name)
    except telemetry.TelemetryConfigError as exc:
        raise ConfigError(str(exc)) from None
    if not config.metrics_listen:
        return 0
    _check_can_bind(config.metrics_listen, "MACHINA_METRICS_LISTEN (--metrics-listen)")
    try:
        return metrics.serve(config.metrics_listen)
    except OSError as exc:
        raise _cannot_listen(
            config.metrics_listen, "MACHINA_METRICS_LISTEN (--metrics-listen)", exc.strerror or "cannot bind"
        ) from None


async def write_port_file(path: str | None, content: str) -> None:
    """Tell whoever started the process which port(s) it bound (port 0 picks a free one)."""
    if path:
        await asyncio.to_thread(Path(path).write_text, content)


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

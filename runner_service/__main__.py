"""``python -m runner_service``: continue handed-off runs (gRPC RunnerService + HTTP /continue shim)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from engine_service import EngineError, __version__
from engine_service.api.serving import (
    ConfigError,
    build_engine,
    check_model_key,
    check_storage,
    is_loopback,
    load_config,
    read_tls_files,
    setup_logging,
    start_observability,
    stop_gracefully,
    telemetry,
    wait_for_stop_signal,
    write_port_file,
)
from runner_service._config import RunnerConfig
from runner_service._grpc import start_grpc
from runner_service._http import build_app
from runner_service._runner import Runner
from runner_service._shim_server import build_http_server

log = logging.getLogger("machina.runner")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner_service",
        description="Machina runner: continues runs that an engine without a capability (e.g. subprocess) "
        "handed off, with the real tools, over the same storage. Settings come from flags, "
        "MACHINA_<NAME> environment variables (MACHINA_RUNNER_SECRET and/or MACHINA_RUNNER_SECRETS "
        "is required) or a TOML --config.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", help="TOML config file (the engine's settings plus runner_* keys)")
    parser.add_argument("--listen", help="gRPC address HOST:PORT (default 127.0.0.1:50052)")
    parser.add_argument("--http-listen", help="HTTP shim address HOST:PORT (default 127.0.0.1:8080)")
    parser.add_argument("--storage", help="the engine's storage: file:///abs/dir or a path")
    parser.add_argument("--workspace", help="workspace of runs whose request names none (default 'default')")
    parser.add_argument("--tls-cert", help="PEM cert chain; serve gRPC and HTTP over TLS with --tls-key")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--log-format", choices=["auto", "json", "text"])
    parser.add_argument("--port-file", help='write {"grpc": port, "http": port} here once serving')
    parser.add_argument(
        "--metrics-listen", help="serve Prometheus metrics on HOST:PORT/metrics (default: not served)"
    )
    return parser.parse_args(argv)


def build_config(ns: argparse.Namespace) -> RunnerConfig:
    config = load_config(
        ns.config,
        cls=RunnerConfig,
        overrides={
            "runner_listen": ns.listen,
            "runner_http_listen": ns.http_listen,
            "storage": ns.storage,
            "runner_workspace": ns.workspace,
            "runner_tls_cert": ns.tls_cert,
            "runner_tls_key": ns.tls_key,
            "log_format": ns.log_format,
            "metrics_listen": ns.metrics_listen,
        },
    )
    # Every request is authenticated, so no listen address is ever served without auth.
    if not config.runner_secret.get_secret_value() and not any(
        v.get_secret_value() for v in config.runner_secrets.values()
    ):
        raise ConfigError(
            "MACHINA_RUNNER_SECRET is required (or runner_secrets per workspace): the engine and the "
            "runner share it"
        )
    if bool(config.runner_tls_cert) != bool(config.runner_tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key (MACHINA_RUNNER_TLS_CERT/_KEY)")
    # The runner has the real tools and never hands a run on.
    return config.model_copy(update={"runner_url": "", "runner_urls": {}})


def read_tls(config: RunnerConfig) -> tuple[bytes, bytes] | None:
    """(PEM key, PEM certificate chain) when TLS is configured, read once at startup."""
    return read_tls_files(config.runner_tls_cert, config.runner_tls_key) if config.runner_tls_cert else None


async def serve(config: RunnerConfig, port_file: str | None) -> None:
    tls = read_tls(config)
    for address in (config.runner_listen, config.runner_http_listen):
        if tls is None and not is_loopback(address):
            log.warning("serving %s without TLS: the runner secret crosses the network in clear", address)
    check_model_key(config)
    engine = build_engine(config)
    try:
        await check_storage(engine.storage, config.storage)
    except BaseException:
        await engine.storage.close()
        raise
    engine.claims_work = False  # it continues runs handed to it, never the engines' queue
    await engine.start()  # MCP servers (the runner can start stdio ones and publishes their tools)
    runner = Runner(
        engine,
        config.runner_secret.get_secret_value(),
        config.runner_workspace,
        {ws: secret.get_secret_value() for ws, secret in config.runner_secrets.items()},
        hold_s=config.test_runner_hold_s,
    )
    server, grpc_port, health = await start_grpc(runner, config.runner_listen, tls=tls)
    http = build_http_server(build_app(runner, config.runner_max_body_bytes), config)
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            await http_task
            raise ConfigError(f"cannot serve HTTP on {config.runner_http_listen}")
        await asyncio.sleep(0.01)
    http_port = http.servers[0].sockets[0].getsockname()[1]
    host = config.runner_http_listen.rpartition(":")[0]
    log.info(
        "runner serving gRPC on %s:%d and HTTP on %s:%d (%s)",
        config.runner_listen.rpartition(":")[0],
        grpc_port,
        host,
        http_port,
        "TLS" if tls else "plaintext",
        extra={"grpc_port": grpc_port, "http_port": http_port},
    )
    await write_port_file(port_file, json.dumps({"grpc": grpc_port, "http": http_port}))
    await wait_for_stop_signal()
    log.info("shutting down: health NOT_SERVING, draining")

    async def close(grace: float) -> None:
        # Runs once health is NOT_SERVING, before the gRPC server's stop does anything.
        runner.accepting = False
        http.should_exit = True
        await runner.close(grace)

    await stop_gracefully(server, health, close, config.shutdown_grace_s)
    await http_task
    log.info("runner stopped")


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        config = build_config(ns)
        setup_logging(config.log_format, config.log_level)
        start_observability(config, "machina-runner")
        asyncio.run(serve(config, ns.port_file))
    except (ConfigError, EngineError) as exc:
        print(f"runner_service: {exc}", file=sys.stderr)
        return 2
    finally:
        telemetry.shutdown()  # export the spans still batched
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

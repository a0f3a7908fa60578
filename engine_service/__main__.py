"""``python -m engine_service``: serve EngineService over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from engine_service import __version__
from engine_service.api._server import SERVICE_NAME, start_server
from engine_service.api.serving import (
    check_model_key,
    check_storage,
    start_observability,
    telemetry,
    wait_for_stop_signal,
    watch_storage_health,
    write_port_file,
)
from engine_service.core._bootstrap import build_engine, open_control
from engine_service.core._config import (
    ConfigError,
    EngineConfig,
    is_loopback,
    load_api_keys,
    load_config,
    read_tls_files,
    redact_url,
)
from engine_service.core._errors import EngineError
from engine_service.core._logging import setup_logging
from engine_service.core._preflight import open_configured_storage
from engine_service.core._retention import RetentionReport, retention_sweep
from engine_service.core._types import Principal

log = logging.getLogger("machina.engine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine_service",
        description="Machina engine: runs LLM agent tasks and serves them over gRPC (EngineService). "
        "Every setting can also come from MACHINA_<NAME> environment variables or a TOML --config file; "
        "flags override the environment, which overrides the file.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "reindex"],
        default="serve",
        help="serve (the default), or reindex: rebuild the control plane's run index from storage and exit "
        "(and retention: see `python -m engine_service retention --help`)",
    )
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument(
        "--listen", help="gRPC address HOST:PORT (default 127.0.0.1:50051; port 0 = any free port)"
    )
    parser.add_argument("--storage", help="file:///abs/dir or a path (default ./.machina)")
    parser.add_argument(
        "--control-url",
        help="postgresql://user:password@host:port/db: the control plane replicas share (unset = none)",
    )
    parser.add_argument(
        "--api-keys-file", help="TOML map of API key -> workspace; unset = one 'default' workspace"
    )
    parser.add_argument(
        "--model",
        dest="model_provider",
        choices=["auto", "scripted", "openai", "anthropic"],
        help="default model provider (auto: Anthropic, OpenAI, then scripted by API keys present)",
    )
    parser.add_argument("--model-name", help="default model name")
    parser.add_argument("--script-file", help="default script for the scripted model (TOML/JSON with turns)")
    parser.add_argument("--tls-cert", help="PEM certificate chain; serve TLS with --tls-key")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument(
        "--capabilities-subprocess",
        choices=["true", "false"],
        help="whether this host may start subprocesses (Bash, stdio MCP)",
    )
    parser.add_argument(
        "--allow-unauthenticated-remote",
        action="store_true",
        default=None,
        help="serve a non-loopback address without API keys (dangerous)",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        default=None,
        help="bind with SO_REUSEPORT: several engine processes sharing storage serve one port",
    )
    parser.add_argument("--log-format", choices=["auto", "json", "text"])
    parser.add_argument(
        "--metrics-listen", help="serve Prometheus metrics on HOST:PORT/metrics (default: not served)"
    )
    parser.add_argument("--port-file", help="write the bound port here once serving (for scripts and tests)")
    return parser.parse_args(argv)


def build_config(ns: argparse.Namespace) -> EngineConfig:
    model = {
        k: v
        for k, v in {
            "provider": ns.model_provider,
            "name": ns.model_name,
            "script_file": ns.script_file,
        }.items()
        if v is not None
    }
    return load_config(
        ns.config,
        overrides={
            "listen": ns.listen,
            "storage": ns.storage,
            "control_url": ns.control_url,
            "api_keys_file": ns.api_keys_file,
            "tls_cert": ns.tls_cert,
            "tls_key": ns.tls_key,
            "capabilities_subprocess": ns.capabilities_subprocess,
            "allow_unauthenticated_remote": ns.allow_unauthenticated_remote,
            "reuse_port": ns.reuse_port,
            "log_format": ns.log_format,
            "metrics_listen": ns.metrics_listen,
            "model": model or None,
        },
    )


def check_security(config: EngineConfig) -> tuple[dict[str, Principal] | None, tuple[bytes, bytes] | None]:
    """API keys and TLS material, refusing unsafe combinations up front."""
    config.check_runner_secrets()
    api_keys = load_api_keys(config.api_keys_file) if config.api_keys_file else None
    if not api_keys and not is_loopback(config.listen) and not config.allow_unauthenticated_remote:
        raise ConfigError(
            f"refusing to serve {config.listen} without API keys: set MACHINA_API_KEYS_FILE, "
            "listen on 127.0.0.1, or pass --allow-unauthenticated-remote"
        )
    tls = None
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        tls = read_tls_files(config.tls_cert, config.tls_key)
    return api_keys, tls


async def serve(
    config: EngineConfig,
    api_keys: dict[str, Principal] | None,
    tls: tuple[bytes, bytes] | None,
    port_file: str | None = None,
) -> None:
    engine = build_engine(config)
    try:
        await check_storage(engine.storage, config.storage)
    except BaseException:
        await engine.storage.close()
        raise
    if engine.default_model.startswith("scripted"):
        log.info(
            "no ANTHROPIC_API_KEY or OPENAI_API_KEY set: the default model is the offline scripted model"
        )
    running = await start_server(
        engine,
        config.listen,
        api_keys=api_keys,
        tls=tls,
        max_message_bytes=config.max_message_bytes,
        reuse_port=config.reuse_port,
    )
    host = config.listen.rpartition(":")[0]
    log.info(
        "engine serving on %s:%d (storage %s, model %s, auth %s)",
        host,
        running.port,
        config.storage,
        engine.default_model,
        "api-keys" if api_keys else "none",
        extra={"port": running.port},
    )
    await write_port_file(port_file, str(running.port))
    watch = asyncio.create_task(
        watch_storage_health(
            running.health,
            ["", SERVICE_NAME],
            engine.storage,
            config.storage_probe_interval_s,
            engine.control.available if config.control_url else None,
        )
    )
    await wait_for_stop_signal()
    watch.cancel()
    log.info("shutting down: health NOT_SERVING, draining for up to %.1fs", config.shutdown_grace_s)
    await running.stop(config.shutdown_grace_s)
    log.info("engine stopped")


async def reindex(config: EngineConfig) -> tuple[int, int]:
    """Rebuild the control plane's run index from storage; returns (runs indexed, rows dropped)."""
    if not config.control_url:
        raise ConfigError("reindex needs a control plane: set MACHINA_CONTROL_URL or --control-url")
    open_control(config)  # a clear line if the postgres extra is missing
    from engine_service.control import reindex as rebuild

    storage = open_configured_storage(config)
    try:
        await check_storage(storage, config.storage)
        try:
            return await rebuild(storage, config.control_url)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"cannot reach the control plane {redact_url(config.control_url)}: {exc}"
            ) from None
    finally:
        await storage.close()


def retention_main(argv: list[str]) -> int:
    """``python -m engine_service retention [--dry-run]``: apply the retention policy once."""
    parser = argparse.ArgumentParser(
        prog="python -m engine_service retention",
        description="Delete the runs that ended longer ago than the retention policy keeps them "
        "(retention_days, workspace_retention_days), in every workspace; print one JSON line per "
        "workspace with the runs and threads deleted.",
    )
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--storage", help="file:///abs/dir, a path or s3://bucket/prefix")
    parser.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    ns = parser.parse_args(argv)
    try:
        config: EngineConfig = load_config(ns.config, overrides={"storage": ns.storage})
        setup_logging(config.log_format, config.log_level)
        reports = asyncio.run(_retention(config, ns.dry_run))
    except (ConfigError, EngineError) as exc:
        print(f"engine_service retention: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        line = {
            "workspace": report.workspace_id,
            "retention_days": report.retention_days,
            "dry_run": report.dry_run,
            "run_ids": report.run_ids,
            "thread_ids": report.thread_ids,
        }
        print(json.dumps(line))
    return 0


async def _retention(config: EngineConfig, dry_run: bool) -> list[RetentionReport]:
    engine = build_engine(config)
    # With a control plane, deletions also leave its index: connect it for the sweep, and
    # closing it lands what the sweep queued there.
    await engine.control.start("retention", lambda *_: None)
    try:
        return await retention_sweep(engine, dry_run=dry_run)
    finally:
        await engine.control.close()
        await engine.storage.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["retention"]:
        return retention_main(args[1:])
    ns = parse_args(argv)
    try:
        config = build_config(ns)
        setup_logging(config.log_format, config.log_level)
        if ns.command == "reindex":
            count, dropped = asyncio.run(reindex(config))
            print(f"indexed {count} runs; dropped {dropped} rows of runs no longer in storage")
            return 0
        api_keys, tls = check_security(config)
        check_model_key(config)
        start_observability(config, "machina-engine")
        asyncio.run(serve(config, api_keys, tls, ns.port_file))
    except (ConfigError, EngineError) as exc:
        print(f"engine_service: {exc}", file=sys.stderr)
        return 2
    finally:
        telemetry.shutdown()  # export the spans still batched
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

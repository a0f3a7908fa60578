"""Typed configuration, read once at startup.

Precedence: command-line flags > ``MACHINA_*`` environment variables > the
TOML file given with ``--config`` > defaults. Nested settings use their section
name in the variable: ``MACHINA_MODEL_PROVIDER``, ``MACHINA_TOOLS_DISABLED``
(comma-separated lists).
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from engine_service._apicall import ApiConfig
from engine_service._ids import is_valid_id
from engine_service._types import Principal
from engine_service.tools._mcp_config import McpServerConfig

ENV_PREFIX = "MACHINA_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The default model and what callers may choose per run."""

    # auto: Anthropic if ANTHROPIC_API_KEY is set, else OpenAI if OPENAI_API_KEY, else scripted.
    provider: Literal["auto", "scripted", "openai", "anthropic"] = "auto"
    name: str = ""
    base_url: str = ""
    # A TOML or JSON file with `turns = [...]` for the scripted model.
    script_file: str = ""
    max_output_tokens: int = Field(4096, ge=1)
    input_cost_per_mtok: float = Field(0.0, ge=0)
    output_cost_per_mtok: float = Field(0.0, ge=0)
    allow_per_run_choice: bool = True
    max_attempts: int = Field(4, ge=1, le=10)


class ToolsConfig(_Section):
    """Which tools exist and their permissions (runs can only narrow them)."""

    enabled: list[str] | None = None
    disabled: list[str] = []
    # Import paths "package.module:name" of custom tools.
    custom: list[str] = []
    permissions: dict[str, Literal["allow", "ask", "deny"]] = {}
    default_permission: Literal["allow", "ask", "deny"] = "allow"
    # Tool results longer than this reach the model truncated; the full text stays in storage (FetchData).
    # At most 500,000 characters, so one tool_call_completed event stays well inside a gRPC message.
    max_result_chars: int = Field(50_000, ge=1_000, le=500_000)
    # WebFetch refuses loopback/private/link-local targets unless allowed here.
    webfetch_allow_private: bool = False
    webfetch_allow_hosts: list[str] = []
    # MCP servers whose tools join the catalogue as mcp__<server>__<tool> ([[tools.mcp_servers]]).
    mcp_servers: list[McpServerConfig] = []


class EngineConfig(_Section):
    listen: str = "127.0.0.1:50051"
    storage: str = "./.machina"
    # Each run gets {workdir_root}/{workspace}/{run_id}/ for Bash and the file tools.
    workdir_root: str = "./.machina/workdirs"
    # Each checkpoint snapshots the run's directory into its storage (so the run can continue
    # on another replica or a runner) up to this many bytes; past it the run fails
    # ERR_WORKDIR_TOO_LARGE. 0 = no snapshots (one host, or a shared workdir_root).
    workdir_snapshot_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    fsync: bool = False
    api_keys_file: str = ""
    # Serving a non-loopback address without API keys must be asked for explicitly.
    allow_unauthenticated_remote: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    # Where async runs that need a missing capability are handed off (POST /continue).
    runner_url: str = ""
    # Per-workspace runner URLs (one runner per tenant); they override runner_url.
    runner_urls: dict[str, str] = {}
    runner_secret: SecretStr = SecretStr("")
    # Webhook signing secrets by reference (a run's webhook names one in secret_ref).
    webhook_secrets: dict[str, SecretStr] = {}
    # PEM CA bundle that verifies an https:// runner (a private CA); empty = the system CAs.
    runner_ca_file: str = ""
    runner_timeout_s: float = Field(5.0, gt=0, le=60)
    capabilities_subprocess: bool = True
    max_turns: int = Field(50, ge=1, le=100_000)
    lease_ttl_s: float = Field(30.0, gt=0)
    # How often to sweep for runs whose executor died (lease expired, queued or running); 0 = at startup.
    recovery_interval_s: float = Field(10.0, ge=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    model: ModelConfig = ModelConfig()
    tools: ToolsConfig = ToolsConfig()
    # Engine-level ApiCall services, credentials (refs -> values; a ref missing here is read
    # from the process environment) and hooks. Runs can add their own services and credentials.
    api: ApiConfig | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_address(value, "listen address")

    @field_validator("runner_ca_file")
    @classmethod
    def _runner_ca_file(cls, value: str) -> str:
        # Fail at startup, not on the first handoff.
        if value:
            try:
                ssl.create_default_context(cafile=value)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the CA file {value!r}: {exc}") from None
        return value

    def runner_tls_verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify`` for the runner handoff: the configured CA bundle, else the system CAs."""
        return ssl.create_default_context(cafile=self.runner_ca_file) if self.runner_ca_file else True


ConfigT = TypeVar("ConfigT", bound=EngineConfig)


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    cls: type[ConfigT] = EngineConfig,  # type: ignore[assignment]  # the default is the bound itself
) -> ConfigT:
    """Merge file, environment and flag overrides into a validated config (EngineConfig or a subclass)."""
    data = _read_toml(path, "config file") if path else {}
    _merge(data, _from_env(os.environ if env is None else env, cls))
    _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


def check_address(value: str, what: str = "address") -> str:
    """``value`` if it looks like HOST:PORT (a pydantic validator's ValueError if not)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} must look like HOST:PORT")
    return value


def _read_toml(path: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path!r} is not valid TOML: {exc}") from None


def read_tls_files(cert: str, key: str) -> tuple[bytes, bytes]:
    """(PEM private key, PEM certificate chain), read once at startup."""
    try:
        return Path(key).read_bytes(), Path(cert).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from None


def _from_env(env: Mapping[str, str], cls: type[EngineConfig]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sections: dict[str, type[BaseModel]] = {"model": ModelConfig, "tools": ToolsConfig}
    for name, field in cls.model_fields.items():
        if name in sections:
            section: dict[str, Any] = {}
            for sub, sub_field in sections[name].model_fields.items():
                value = env.get(f"{ENV_PREFIX}{name.upper()}_{sub.upper()}")
                if value is not None:
                    section[sub] = _parse_env(value, sub_field.annotation)
            if section:
                out[name] = section
            continue
        value = env.get(f"{ENV_PREFIX}{name.upper()}")
        if value is not None:
            out[name] = _parse_env(value, field.annotation)
    return out


def _parse_env(value: str, annotation: Any) -> Any:
    if "list" in str(annotation):
        return [v.strip() for v in value.split(",") if v.strip()]
    if "dict" in str(annotation):
        # name=perm,name2=perm
        return dict(item.split("=", 1) for item in value.split(",") if "=" in item)
    return value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def load_api_keys(path: str) -> dict[str, Principal]:
    """Read a TOML map of API key -> workspace (or -> {workspace, name}).

    The identity recorded on decisions is ``name`` if given, else a short
    fingerprint of the key — never the key itself.
    """
    raw = _read_toml(path, "API keys file")
    keys = raw.get("keys", raw)
    out: dict[str, Principal] = {}
    for index, (key, value) in enumerate(keys.items(), start=1):
        if isinstance(value, str):
            workspace, name = value, ""
        elif isinstance(value, Mapping) and isinstance(value.get("workspace"), str):
            workspace, name = value["workspace"], str(value.get("name", ""))
        else:
            raise ConfigError(f"API keys file {path!r}: entry {index} must map a key to a workspace id")
        if not is_valid_id(workspace):
            raise ConfigError(f"API keys file {path!r}: entry {index} has an invalid workspace id")
        if len(key) < 8:
            raise ConfigError(f"API keys file {path!r}: entry {index} has a key shorter than 8 characters")
        out[key] = Principal(workspace, name or f"key:{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    return out


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")

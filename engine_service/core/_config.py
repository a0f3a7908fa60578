"""Typed configuration, read once at startup.

Precedence: command-line flags > ``MACHINA_*`` environment variables > the
TOML file given with ``--config`` > defaults. Nested settings use their section
name in the variable: ``MACHINA_MODEL_PROVIDER``, ``MACHINA_TOOLS_DISABLED``
(comma-separated lists).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from engine_service.core._ids import is_valid_id
from engine_service.core._types import Principal
from engine_service.net._egress import EgressPolicy, Resolver
from engine_service.tools._apicall_config import ApiConfig
from engine_service.tools._mcp_config import McpServerConfig

ENV_PREFIX = "MACHINA_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Section):
    """Where one model provider is reached, with which key, and what its models cost."""

    # Empty: the provider's public endpoint.
    base_url: str = ""
    # The environment variable holding the API key; empty: OPENAI_API_KEY / ANTHROPIC_API_KEY.
    api_key_env: str = ""
    # USD per million input and output tokens, by model name, optionally followed by the prices
    # of cache reads and cache writes (else those cost what other input does):
    # {"gpt-4o-mini" = [0.15, 0.6], "claude-sonnet-4-5" = [3, 15, 0.3, 3.75]};
    # in an environment variable, "gpt-4o-mini=0.15/0.6,claude-sonnet-4-5=3/15/0.3/3.75".
    prices: dict[str, tuple[float, float] | tuple[float, float, float, float]] = {}
    # Context windows in tokens, by model name (for models the engine does not know).
    context_window_tokens: dict[str, int] = {}

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: tuple(v.split("/")) if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("prices")
    @classmethod
    def _non_negative(
        cls, value: dict[str, tuple[float, float] | tuple[float, float, float, float]]
    ) -> dict[str, tuple[float, float] | tuple[float, float, float, float]]:
        if any(price < 0 for pair in value.values() for price in pair):
            raise ValueError("prices must not be negative")
        return value

    @field_validator("context_window_tokens")
    @classmethod
    def _positive_windows(cls, value: dict[str, int]) -> dict[str, int]:
        if any(size < 1 for size in value.values()):
            raise ValueError("context windows must be positive")
        return value


class ModelConfig(_Section):
    """The default model and what callers may choose per run."""

    # auto: Anthropic if ANTHROPIC_API_KEY is set, else OpenAI if OPENAI_API_KEY, else scripted.
    provider: Literal["auto", "scripted", "openai", "anthropic"] = "auto"
    name: str = ""
    # The default provider's endpoint (a provider's own base_url below wins).
    base_url: str = ""
    # A TOML or JSON file with `turns = [...]` for the scripted model.
    script_file: str = ""
    max_output_tokens: int = Field(4096, ge=1)
    # Prices of the default provider's models that its `prices` table does not list; unset = unknown.
    input_cost_per_mtok: float | None = Field(None, ge=0)
    output_cost_per_mtok: float | None = Field(None, ge=0)
    # The context window of models the provider tables below and the engine do not know; 0 = none
    # (no compaction for them).
    context_window_tokens: int = Field(0, ge=0)
    # When a model request is estimated past this share of the context window, older turns are
    # summarised (compacted) and the model sees the summary and the last compact_keep_turns turns.
    compact_at: float = Field(0.8, gt=0, le=1)
    compact_keep_turns: int = Field(4, ge=1)
    # Per-provider settings ([model.openai], [model.anthropic]; MACHINA_MODEL_OPENAI_BASE_URL, ...).
    openai: ProviderConfig = ProviderConfig()
    anthropic: ProviderConfig = ProviderConfig()
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
    # WebFetch's own additions to the engine's egress_allow_* settings (WebFetch only).
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
    # How long the checkpoint that records a turn's finished tool calls may wait for the run's
    # next checkpoint, which then commits both (one write, and with fsync one sync, a turn
    # instead of two). A crash in that window loses those results: the recovered run reports
    # the calls as interrupted, as after a crash during them. 0 = committed before the next
    # model call.
    commit_delay_s: float = Field(0.05, ge=0, le=10)
    # Bind the gRPC port with SO_REUSEPORT, so several engine processes on this machine (sharing
    # storage) serve one port and the kernel spreads connections over them. Any process of the
    # same user may then bind it too: see SECURITY.md.
    reuse_port: bool = False
    api_keys_file: str = ""
    # Serving a non-loopback address without API keys must be asked for explicitly.
    allow_unauthenticated_remote: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    # Where async runs that need a missing capability are handed off (POST /continue).
    runner_url: str = ""
    # Per-workspace runner URLs (one runner per tenant); they override runner_url.
    runner_urls: dict[str, str] = {}
    # The bearer secret of the runner handoff: runner_secrets[workspace] if set, else runner_secret.
    # An engine with a runner URL for a workspace that has neither refuses to start; a runner
    # accepts a run only with the secret of the run's workspace.
    runner_secret: SecretStr = SecretStr("")
    runner_secrets: dict[str, SecretStr] = {}
    # Destinations a tenant or the model chooses (WebFetch, per-run ApiCall services, webhooks)
    # may not be loopback, private, link-local, CGNAT, multicast, reserved or cloud metadata
    # addresses unless allowed here: host names or IP literals, networks (CIDR), or every
    # non-public address except cloud metadata (allow_private).
    egress_allow_hosts: list[str] = []
    egress_allow_networks: list[str] = []
    egress_allow_private: bool = False
    # Hosts WebFetch, ApiCall and webhooks send the run's trace context (W3C traceparent) to, when tracing
    # is on: names or IP literals, "*.example.com" for its subdomains, "*" for every host.
    # Default none: a trace id tells whoever receives it which requests belong together.
    propagate_trace_to: list[str] = []
    # Webhook signing secrets by reference: a run's webhook names one in secret_ref, and nothing
    # else (never a process environment variable). webhook_secrets serve every workspace;
    # workspace_webhook_secrets[workspace] only that one (and win over a shared one of that name).
    webhook_secrets: dict[str, SecretStr] = {}
    workspace_webhook_secrets: dict[str, dict[str, SecretStr]] = {}
    # PEM CA bundle that verifies an https:// runner (a private CA); empty = the system CAs.
    runner_ca_file: str = ""
    runner_timeout_s: float = Field(5.0, gt=0, le=60)
    # A handed-off run that no runner has taken (its lease) within handoff_deadline_s is handed
    # off again, waiting twice as long each time; after handoff_attempts it fails ERR_RUNNER_LOST.
    handoff_deadline_s: float = Field(30.0, gt=0)
    handoff_attempts: int = Field(3, ge=1, le=20)
    capabilities_subprocess: bool = True
    # Processes started for a run (Bash) run under bubblewrap. Where it cannot run, the host
    # lacks the subprocess capability; "none" runs them unsandboxed (logged as a warning).
    sandbox: Literal["bubblewrap", "none"] = "bubblewrap"
    # Keep the host's network inside the sandbox (loopback included: the engine's own ports).
    sandbox_network: bool = False
    # Names of the engine's environment variables a sandboxed process sees (nothing else is passed).
    sandbox_env: list[str] = []
    # Extra host paths mounted read-only (e.g. a toolchain under /opt).
    sandbox_ro_paths: list[str] = []
    # Per-call rlimits: CPU seconds and address space per process, processes, file size, open files.
    sandbox_cpu_s: int = Field(300, ge=1)
    sandbox_memory_mb: int = Field(4096, ge=64)
    sandbox_max_processes: int = Field(256, ge=8)
    sandbox_max_file_mb: int = Field(1024, ge=1)
    sandbox_max_open_files: int = Field(1024, ge=16)
    max_turns: int = Field(50, ge=1, le=100_000)
    # How deep subagents (the Agent tool) may nest: 1 = children only, no grandchildren.
    max_agent_depth: int = Field(2, ge=1, le=8)
    # How many subagents of one run (its whole tree) may work at once; an Agent call past it
    # starts none (ERR_AGENT_LIMIT), so one model turn cannot start thousands.
    max_parallel_agents: int = Field(8, ge=1, le=256)
    lease_ttl_s: float = Field(30.0, gt=0)
    # How often to sweep for runs whose executor died (lease expired, queued or running); 0 = at startup.
    recovery_interval_s: float = Field(10.0, ge=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # Runs that ended more than this many days ago are deleted (0 = kept forever);
    # workspace_retention_days[workspace] overrides it for one workspace. The background sweep
    # applies it every retention_interval_s (0 = only when asked: ApplyRetention, the CLI).
    retention_days: float = Field(0.0, ge=0)
    workspace_retention_days: dict[str, float] = {}
    retention_interval_s: float = Field(3600.0, ge=0)
    # How often a serving process checks that storage answers; health is NOT_SERVING while it does not.
    storage_probe_interval_s: float = Field(10.0, gt=0)
    # How long a run waits for unavailable storage (read-only, full, 5xx), retrying, before it is
    # left at its last checkpoint for the recovery sweep (here or on a replica) to resume.
    storage_retry_s: float = Field(300.0, gt=0)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # The PostgreSQL control plane that replicas share (postgresql://user:password@host:port/db):
    # a run index, a work queue, durable timers, live fan-out. Empty: none (storage alone).
    control_url: str = ""
    # With a control plane: how many runs of one workspace execute at once across all replicas
    # (more wait QUEUED, first in first out); 0 = no limit.
    workspace_max_running: int = Field(0, ge=0)
    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Serve Prometheus metrics on http://HOST:PORT/metrics (MACHINA_METRICS_LISTEN, --metrics-listen);
    # "" = not served. Plain HTTP without authentication: keep it on loopback or a private network.
    metrics_listen: str = ""
    model: ModelConfig = ModelConfig()
    tools: ToolsConfig = ToolsConfig()
    # Engine-level ApiCall services, credentials (refs -> values; a ref missing here is read
    # from the process environment) and hooks. Runs can add their own services and credentials.
    api: ApiConfig | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_address(value, "listen address")

    @field_validator("control_url")
    @classmethod
    def _control_url(cls, value: str) -> str:
        if value:
            check_control_url(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        return check_address(value, "metrics listen address") if value else value

    @field_validator("egress_allow_networks")
    @classmethod
    def _egress_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network like 10.0.0.0/8 or fd00::/8") from None
        return value

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

    def egress_policy(self, resolver: Resolver | None = None) -> EgressPolicy:
        """The policy for destinations tenants and models choose (``resolver``: tests only)."""
        return EgressPolicy.from_settings(
            allow_private=self.egress_allow_private,
            allow_hosts=self.egress_allow_hosts,
            allow_networks=self.egress_allow_networks,
            resolver=resolver,
        )

    def runner_secret_for(self, workspace: str) -> str:
        """The handoff bearer secret of ``workspace``'s runs ("" if none is configured)."""
        own = self.runner_secrets.get(workspace)
        return (own or self.runner_secret).get_secret_value()

    def webhook_secret(self, workspace: str, ref: str) -> str | None:
        """The webhook signing secret ``ref`` names for ``workspace``, if one is configured for it."""
        found = self.workspace_webhook_secrets.get(workspace, {}).get(ref) or self.webhook_secrets.get(ref)
        return found.get_secret_value() if found is not None and found.get_secret_value() else None

    def check_runner_secrets(self) -> None:
        """ConfigError unless every workspace a runner URL serves has a handoff secret.

        Without one the handoff would POST with no Authorization header.
        """
        # runner_url serves every workspace without a runner_urls entry, any workspace at all.
        if self.runner_url and not self.runner_secret.get_secret_value():
            raise ConfigError(
                "runner_url is set but runner_secret (MACHINA_RUNNER_SECRET) is empty: "
                "the runner handoff must be authenticated"
            )
        urls = self.runner_urls.items()
        if missing := sorted(w for w, url in urls if url and not self.runner_secret_for(w)):
            raise ConfigError(
                f"runner_urls has a URL for workspace(s) {missing} but no secret for them: set "
                "runner_secrets.<workspace> or runner_secret (MACHINA_RUNNER_SECRET)"
            )

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


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"


def check_control_url(value: str) -> None:
    """A pydantic validator's ValueError unless ``value`` is a usable postgresql:// URL (the
    message never shows its password)."""
    from urllib.parse import urlsplit

    shown = redact_url(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError when not a number in range)
    except ValueError:
        raise ValueError(f"{shown!r} is not a valid URL") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"{shown!r} must be a postgresql:// URL (postgresql://user:password@host:5432/db)")
    if not parts.hostname and "host=" not in parts.query:
        raise ValueError(f"{shown!r} names no host")


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
                prefix = f"{ENV_PREFIX}{name.upper()}_{sub.upper()}"
                if sub_field.annotation is ProviderConfig:
                    # One level deeper: MACHINA_MODEL_OPENAI_BASE_URL and the like.
                    provider = {
                        leaf: _parse_env(env[f"{prefix}_{leaf.upper()}"], leaf_field.annotation)
                        for leaf, leaf_field in ProviderConfig.model_fields.items()
                        if f"{prefix}_{leaf.upper()}" in env
                    }
                    if provider:
                        section[sub] = provider
                    continue
                value = env.get(prefix)
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

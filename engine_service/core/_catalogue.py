"""Assembling a run's tools: built-ins, MCP servers' tools, client tools and ApiCall."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_service.core._checkpoint import RunEnv
from engine_service.core._config import EngineConfig
from engine_service.core._errors import missing_extra
from engine_service.core._run import RunSpec
from engine_service.core._types import JsonObject, Permission
from engine_service.models import ScriptedModel
from engine_service.models._select import context_window, model_price
from engine_service.net._egress import EgressPolicy
from engine_service.tools import (
    EDIT,
    FETCH_DATA,
    GLOB,
    GREP,
    READ,
    WRITE,
    Sandbox,
    WebFetchPolicy,
    bash_tool,
    mcp_tool_prefix,
    web_fetch_tool,
)
from engine_service.tools._apicall import (
    ApiConfig,
    ApiService,
    api_tool_enabled,
    build_api_call_tool,
    load_resolve_auth,
)
from engine_service.tools._registry import (
    AGENT,
    AGENT_TOOL,
    ASK_USER,
    Tool,
    capability_stub,
    client_tool,
    load_hook,
)

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

MCP_FEATURE = "MCP servers (tools.mcp_servers)"
log = logging.getLogger("machina.engine")


class ToolCatalogue:
    """Part of an :class:`Engine`, kept beside it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        api = engine.config.api or ApiConfig()
        self.api_services = list(api.services)
        self.per_run_custom_ids = frozenset(api.per_run_custom_auth_ids)
        self._api_env = {k: v.get_secret_value() for k, v in api.env.items()}
        self._resolve_auth = load_resolve_auth(api.resolve_auth) if api.resolve_auth else None
        self._api_hooks = tuple(
            load_hook(path) if path else None for path in (api.on_request, api.on_response)
        )
        # Per-run ApiCall credentials: memory only, never persisted.
        self.run_api_env: dict[tuple[str, str], dict[str, str]] = {}
        self._mcp: Any = None  # tools._mcp.McpManager, imported only when servers are configured

    async def connect_mcp(self) -> None:
        """Add the MCP servers' tools: those this host can start, else what a runner published."""
        servers = self._engine.config.tools.mcp_servers
        local = [c for c in servers if c.transport == "http" or "subprocess" in self._engine._capabilities]
        if local:
            try:
                from engine_service.tools._mcp import McpManager
            except ModuleNotFoundError as exc:
                raise missing_extra("mcp", "mcp", MCP_FEATURE, exc) from None

            self._mcp = McpManager(local)
            await self._mcp.start()
            tools = await self._mcp.list_tools()
            for tool in tools:
                self._engine.tools.register(tool)
            for config in (c for c in local if c.transport == "stdio"):
                prefix = mcp_tool_prefix(config.name)
                catalogue = [
                    {"name": t.name, "description": t.description, "input_schema": t.input_schema,
                     "idempotent": t.idempotent}
                    for t in tools if t.name.startswith(prefix)
                ]  # fmt: skip
                await self._engine.storage.put_shared(f"mcp-{config.name}", {"tools": catalogue})
        for config in servers:
            if config in local:
                continue
            doc = await self._engine.storage.get_shared(f"mcp-{config.name}")
            if doc is None:
                log.warning(
                    "MCP server %s needs subprocess, which this host lacks, and no runner has published "
                    "its tools yet; start the runner first", config.name, extra={"mcp_server": config.name},
                )  # fmt: skip
                continue
            for t in doc["tools"]:
                needs = frozenset({"subprocess"})
                idempotent = bool(t.get("idempotent", False))
                self._engine.tools.register(
                    Tool(
                        t["name"],
                        t["description"],
                        t["input_schema"],
                        capabilities=needs,
                        idempotent=idempotent,
                    )
                )

    def run_tools(self, ws: str, spec: RunSpec, spec_doc: JsonObject) -> dict[str, Tool]:
        """The tools one run sees: this host's (stubs for what it cannot run), client tools, ApiCall."""
        cfg = self._engine.config
        tools: dict[str, Tool] = {}
        enabled = set(cfg.tools.enabled) if cfg.tools.enabled is not None else None
        for name in self._engine.tools.names():
            if name in cfg.tools.disabled or (enabled is not None and name not in enabled):
                continue
            tool = self._engine.tools.get(name)
            assert tool is not None
            missing = tool.capabilities - self._engine._capabilities
            # A tool this host cannot run stays visible to the model as a stub.
            tools[name] = capability_stub(tool, missing) if missing else tool
        for t in spec_doc.get("client_tools", ()):
            tools[t["name"]] = client_tool(t["name"], t["description"], t["input_schema"])
        if spec.mcp_servers is not None:
            chosen = {mcp_tool_prefix(name) for name in spec.mcp_servers}
            tools = {
                n: t for n, t in tools.items() if not n.startswith("mcp__") or n.startswith(tuple(chosen))
            }
        api_tool = self.api_call_tool(ws, spec)
        if api_tool is not None:
            tools[api_tool.name] = api_tool
        if spec.tools is not None:
            tools = {n: t for n, t in tools.items() if n in spec.tools}
            # Subagents only for runs that name the Agent tool (core/_subagents.py).
            if AGENT_TOOL in spec.tools and AGENT_TOOL not in cfg.tools.disabled:
                tools[AGENT_TOOL] = AGENT
        return tools

    def api_call_tool(self, ws: str, spec: RunSpec) -> Tool | None:
        """ApiCall for this run: engine services plus the run's own, or None when there are none.

        The run's services add to the engine's (never replace one); their refs read the run's
        env only, and their custom auth only ids in api.per_run_custom_auth_ids.
        """
        taken = {s.name.lower() for s in self.api_services}
        per_run = [ApiService.model_validate(s) for s in spec.api_services]
        if shadowing := [s.name for s in per_run if s.name.lower() in taken]:
            # Refused at the door; a run stored before that keeps the engine's service.
            log.warning("run %s: per-run services %s shadow engine services; ignored", spec.run_id,
                        shadowing, extra={"run_id": spec.run_id})  # fmt: skip
            per_run = [s for s in per_run if s.name.lower() not in taken]
        if not api_tool_enabled([*self.api_services, *per_run], self._engine.config.tools.disabled):
            return None
        run_key, run_envs = (ws, spec.run_id), self.run_api_env
        engine_env = self._api_env

        def run_lookup(ref: str) -> str | None:
            # Looked up at each call: credentials re-supplied on a ResumeRun reach a tool
            # built before them (a run kept in memory since its pause).
            return run_envs.get(run_key, {}).get(ref)

        def engine_lookup(ref: str) -> str | None:
            return engine_env.get(ref) or os.environ.get(ref)

        on_request, on_response = self._api_hooks
        return build_api_call_tool(
            self.api_services,
            env_lookup=engine_lookup,
            resolve_auth=self._resolve_auth,
            on_request=on_request,
            on_response=on_response,
            per_run_services=per_run,
            run_env_lookup=run_lookup,
            per_run_custom_auth_ids=self.per_run_custom_ids,
            # The operator's own services are trusted; a tenant's may only reach what the
            # egress policy allows.
            egress=self._engine.egress,
            trace_hosts=self._engine.config.propagate_trace_to,
        )

    def run_env(
        self, ws: str, spec: RunSpec, spec_doc: JsonObject, provider: str, model_name: str, mode: str
    ) -> RunEnv:
        """Everything one run needs to execute: its model, tools, permissions, limits and storage."""
        cfg = self._engine.config
        tools = self._engine._catalogue.run_tools(ws, spec, spec_doc)
        engine_perms = {k: Permission(v) for k, v in cfg.tools.permissions.items()}
        default = Permission(cfg.tools.default_permission)

        def permission(name: str) -> Permission:
            return engine_perms.get(name, default).narrow(spec.permissions.get(name))

        model = (
            ScriptedModel(spec.script or [], model_name)
            if provider == "scripted"
            else self._engine._model_factory(provider, model_name)
        )
        return RunEnv(
            storage=self._engine.storage,
            model=model,
            tools=tools,
            permissions=permission,
            system_prompt=spec.system_prompt,
            max_turns=spec.max_turns or cfg.max_turns,
            max_output_tokens=spec.max_output_tokens or cfg.model.max_output_tokens,
            # Unknown prices count as 0: a run with a cost budget needs known ones (create_run).
            price=model_price(cfg, self._engine._default_provider, provider, model_name) or (0.0,) * 4,
            owner=self._engine._owner,
            lease_ttl=cfg.lease_ttl_s,
            workdir=Path(cfg.workdir_root).resolve() / ws / spec.run_id,
            snapshots=self._engine._snapshots,
            max_result_chars=cfg.tools.max_result_chars,
            handoff=self._engine._runner.post if mode == "async" and self._engine._runner.url(ws) else None,
            notify=self._engine._notify_webhook,
            clock=self._engine._clock,
            storage_retry_s=cfg.storage_retry_s,
            commit_delay=cfg.commit_delay_s,
            control=self._engine.control,
            max_agent_depth=cfg.max_agent_depth,
            max_parallel_agents=cfg.max_parallel_agents,
            context_window_tokens=context_window(cfg, provider, model_name, spec.context_window_tokens),
            compact_at=cfg.model.compact_at,
            compact_keep_turns=cfg.model.compact_keep_turns,
        )

    async def close(self) -> None:
        if self._mcp is not None:
            await self._mcp.close()


def builtin_tools(
    config: EngineConfig, egress: EgressPolicy | None = None, sandbox: Sandbox | None = None
) -> list[Tool]:
    """The built-in catalogue: AskUser, the file tools, Bash (in ``sandbox``), WebFetch, FetchData."""
    policy = WebFetchPolicy(
        allow_private=config.tools.webfetch_allow_private,
        allow_hosts=frozenset(config.tools.webfetch_allow_hosts),
        egress=egress or config.egress_policy(),
        trace_hosts=frozenset(config.propagate_trace_to),
    )
    bash = bash_tool(sandbox or Sandbox.from_config(config))
    return [ASK_USER, READ, WRITE, EDIT, GLOB, GREP, bash, web_fetch_tool(policy), FETCH_DATA]


def host_capabilities(config: EngineConfig, sandbox: Sandbox | None = None) -> frozenset[str]:
    """What this host offers to tools that declare needs (see Tool.capabilities).

    ``subprocess`` means "can start a process for a run in a sandbox": a host where
    bubblewrap cannot run lacks it, unless the operator chose ``sandbox = "none"``.
    """
    if not config.capabilities_subprocess:
        return frozenset()
    sandbox = sandbox or Sandbox.from_config(config)
    return frozenset({"subprocess"} if sandbox.unavailable_reason() is None else ())

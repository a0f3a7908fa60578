"""Checking what a caller asks for before a run exists: its spec, model choice and webhook."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jsonschema
from pydantic import ValidationError

from engine_service.core._errors import EngineError, ErrorKind, invalid, shown, shown_list
from engine_service.core._ids import check_id
from engine_service.core._regex import check_schema
from engine_service.core._run import ClientToolDef, RunSpec
from engine_service.core._types import JsonObject
from engine_service.models._select import (
    check_run_context_window,
    default_model_name,
    infer_provider,
    validate_script,
)
from engine_service.net._egress import EgressPolicy
from engine_service.net._webhooks import WebhookConfig
from engine_service.tools import select_servers
from engine_service.tools._apicall import ApiConfig, ApiPolicyError, ApiService, check_per_run_services
from engine_service.tools._registry import AGENT_TOOL

if TYPE_CHECKING:
    from engine_service.core._engine import Engine

MAX_TASK_CHARS = 200_000


def check_labels(labels: Mapping[str, str], field: str) -> None:
    """Labels (of a run, or a ListRuns filter) hold no NUL character: no index could store or
    match one."""
    for key, value in labels.items():
        if "\x00" in key or "\x00" in value:
            raise invalid("ERR_INVALID_REQUEST", f"{field} must not contain the NUL character", field=field)


class SpecChecks:
    """Part of an :class:`Engine`, kept beside it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def validate_spec(self, spec: RunSpec, client_tools: Sequence[ClientToolDef]) -> None:
        if not spec.task.strip():
            raise invalid("ERR_INVALID_REQUEST", "task must not be empty", field="task")
        if len(spec.task) > MAX_TASK_CHARS:
            raise invalid(
                "ERR_INVALID_REQUEST",
                f"task is longer than {MAX_TASK_CHARS} characters",
                field="task",
                length=len(spec.task),
            )
        if spec.run_id:
            check_id(spec.run_id, "run_id")
        check_labels(spec.labels, "labels")
        for name, value in (
            ("max_turns", spec.max_turns),
            ("max_tokens", spec.max_tokens),
            ("timeout_ms", spec.timeout_ms),
            ("approval_timeout_ms", spec.approval_timeout_ms),
            ("max_output_tokens", spec.max_output_tokens),
            ("model.context_window_tokens", spec.context_window_tokens),
        ):
            if value < 0:
                raise invalid("ERR_INVALID_REQUEST", f"{name} must not be negative", field=name, value=value)
        check_run_context_window(spec.context_window_tokens)
        if not math.isfinite(spec.max_cost_usd) or spec.max_cost_usd < 0:
            # NaN compares false with everything: unchecked, it would be a budget never reached.
            raise invalid(
                "ERR_INVALID_REQUEST",
                "max_cost_usd must be a finite number, not negative",
                field="max_cost_usd",
                value=spec.max_cost_usd,
            )
        names = set(self._engine.tools.names()) | {AGENT_TOOL}
        for t in client_tools:
            if not t.name or len(t.name) > 64 or not all(c.isalnum() or c in "_-" for c in t.name):
                raise invalid(
                    "ERR_INVALID_REQUEST",
                    f"client tool name {shown(t.name)!r} must match [A-Za-z0-9_-]{{1,64}}",
                    field="client_tools",
                )
            if t.name in names:
                raise invalid(
                    "ERR_INVALID_REQUEST",
                    f"client tool {t.name!r} clashes with another tool",
                    field="client_tools",
                    tool=t.name,
                )
            names.add(t.name)
        for listed, what in (
            (spec.tools or [], "tools"),
            (list(spec.permissions), "permissions"),
            (spec.gated_tools, "gated_tools"),
        ):
            unknown = sorted(set(listed) - names)
            if unknown:
                raise invalid(
                    "ERR_UNKNOWN_TOOL",
                    f"{what} names unknown tools: {shown_list(unknown)}",
                    field=what,
                    tools=shown_list(unknown),
                )
        schemas = [("output_schema", spec.output_schema)] if spec.output_schema is not None else []
        schemas += [("client_tools", t.input_schema) for t in client_tools]
        for field_name, schema in schemas:
            try:
                check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise invalid(
                    "ERR_INVALID_REQUEST",
                    f"{field_name} is not a valid JSON Schema: {shown(exc.message, 500)}",
                    field=field_name,
                ) from None
        if spec.script is not None:
            validate_script(spec.script)
        for path, turns in spec.agent_scripts.items():
            if not path or len(path) > 512:
                raise invalid(
                    "ERR_INVALID_SCRIPT", "a subagent script needs an agent_path", field="model.agent_scripts"
                )
            validate_script(turns)
        if spec.sandbox_network and not self._engine.config.sandbox_network:
            raise invalid(
                "ERR_INVALID_REQUEST",
                "sandbox_network: this engine gives sandboxed processes no network; a run can only narrow it",
                field="sandbox_network",
            )
        if spec.mcp_servers is not None:
            try:
                select_servers(self._engine.config.tools.mcp_servers, spec.mcp_servers)
            except ValueError as exc:
                raise invalid("ERR_INVALID_REQUEST", shown(exc, 500), field="mcp_servers") from None
        try:
            per_run = ApiConfig(services=[ApiService.model_validate(s) for s in spec.api_services]).services
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise invalid(
                "ERR_INVALID_REQUEST", f"invalid api services: {shown(problems, 500)}", field="api"
            ) from None
        for service in per_run:
            check_destination(self._engine.egress, service.base_url, f"api.services[{service.name}].base_url")
        try:
            catalogue = self._engine._catalogue
            check_per_run_services(catalogue.api_services, per_run, catalogue.per_run_custom_ids)
        except ApiPolicyError as exc:
            # Asking for an engine credential is not allowed; a name clash is a malformed spec.
            denied = exc.reason == "ERR_API_AUTH_NOT_ALLOWED"
            kind = ErrorKind.PERMISSION_DENIED if denied else ErrorKind.INVALID_ARGUMENT
            metadata = {"field": "api.services", **exc.metadata}
            raise EngineError(exc.reason, str(exc), kind=kind, metadata=metadata) from None

    def choose_model(self, spec: RunSpec) -> tuple[str, str]:
        # A bare model name ("gpt-4o", "claude-sonnet-4-5") names its provider by a well-known
        # prefix; any other name is the default provider's (e.g. a model an OpenAI-compatible
        # server such as vLLM serves).
        inferred = infer_provider(spec.model_name) if spec.model_name and not spec.model_provider else None
        provider = spec.model_provider or inferred or self._engine._default_provider
        if (
            spec.model_provider or spec.model_name or spec.script is not None
        ) and not self._engine.config.model.allow_per_run_choice:
            raise EngineError(
                "ERR_PERMISSION_DENIED",
                "this engine does not allow choosing the model per run",
                kind=ErrorKind.PERMISSION_DENIED,
            )
        if provider not in ("scripted", "openai", "anthropic"):
            raise invalid(
                "ERR_INVALID_REQUEST",
                f"unknown model provider {shown(provider)!r}: use scripted, openai or anthropic, "
                "'provider:model', or a model name such as gpt-4o or claude-sonnet-4-5",
                field="model.provider",
            )
        if provider == "scripted":
            if spec.script is None:
                if self._engine._default_script is None:
                    raise invalid(
                        "ERR_INVALID_SCRIPT",
                        "the scripted model needs a script: pass model.script or configure model.script_file",
                    )
                spec.script = self._engine._default_script
            return provider, spec.model_name or "script"
        if spec.script is not None or spec.agent_scripts:
            raise invalid(
                "ERR_INVALID_SCRIPT", f"a script only makes sense with the scripted model, not {provider}"
            )
        name = spec.model_name or (
            self._engine._default_model if provider == self._engine._default_provider else ""
        )
        return provider, name or default_model_name(provider)

    def validate_webhook(self, ws: str, webhook: Mapping[str, Any] | None) -> JsonObject | None:
        doc = validate_webhook(webhook, self._engine.egress)
        ref = doc.get("secret_ref") if doc else None
        if ref and self._engine.config.webhook_secret(ws, ref) is None:
            # Only secrets configured for webhooks (this workspace's or shared) sign: a ref naming
            # anything else, e.g. a process variable, would make the engine an HMAC oracle.
            raise invalid(
                "ERR_WEBHOOK_SECRET_UNKNOWN",
                # The ref is not echoed: a caller may have put a secret itself there by mistake.
                "webhook secret_ref names no webhook secret configured for this workspace",
                field="webhook.secret_ref",
            )
        return doc


def validate_webhook(webhook: Mapping[str, Any] | None, egress: EgressPolicy) -> JsonObject | None:
    if not webhook:
        return None
    try:
        config = WebhookConfig.model_validate(dict(webhook))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise invalid(
            "ERR_INVALID_REQUEST", f"invalid webhook: {shown(problems, 500)}", field="webhook"
        ) from None
    check_destination(egress, config.url, "webhook.url")
    return config.model_dump()


def check_destination(egress: EgressPolicy, url: str, what: str) -> None:
    """INVALID_ARGUMENT when ``url``'s host is a literal the egress policy refuses.

    Host names are resolved and checked on every connection instead (a name's answer can change).
    """
    refusal = egress.url_refusal(url)
    if refusal:
        raise invalid("ERR_DESTINATION_REFUSED", f"{what}: {shown(refusal, 300)}", field=what)

"""Choosing and building models: defaults, zero-config selection, scripts."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

from engine_service.core._config import EngineConfig, ProviderConfig
from engine_service.core._errors import invalid
from engine_service.core._limits import MAX_DEPTH, too_deep
from engine_service.core._run import ScriptedTurn
from engine_service.models._anthropic import AnthropicModel
from engine_service.models._base import ModelAdapter, RetryPolicy
from engine_service.models._http import HttpModel
from engine_service.models._openai import OpenAIModel

MAX_SCRIPT_TURNS = 100_000

ModelFactory = Callable[[str, str], ModelAdapter]

# The HTTP providers: adapter class and the environment variable holding its API key.
_HTTP_PROVIDERS: dict[str, tuple[type[HttpModel], str]] = {
    "openai": (OpenAIModel, "OPENAI_API_KEY"),
    "anthropic": (AnthropicModel, "ANTHROPIC_API_KEY"),
}


def validate_script(script: list[ScriptedTurn]) -> None:
    if not script:
        raise invalid("ERR_INVALID_SCRIPT", "the script has no turns", field="model.script")
    if len(script) > MAX_SCRIPT_TURNS:
        raise invalid(
            "ERR_INVALID_SCRIPT", f"the script has more than {MAX_SCRIPT_TURNS} turns", field="model.script"
        )
    for index, turn in enumerate(script, start=1):
        if not turn.text and not turn.tool_calls:
            raise invalid(
                "ERR_INVALID_SCRIPT",
                f"script turn {index} has neither text nor tool calls",
                field="model.script",
                turn=index,
            )
        for call_index, (name, arguments) in enumerate(turn.tool_calls, start=1):
            if not name:
                raise invalid(
                    "ERR_INVALID_SCRIPT",
                    f"script turn {index}, tool call {call_index} has no name",
                    field="model.script",
                    turn=index,
                )
            if not isinstance(arguments, dict):
                raise invalid(
                    "ERR_INVALID_SCRIPT",
                    f"script turn {index}, tool call {call_index}: arguments must be an object",
                    field="model.script",
                    turn=index,
                )
            if too_deep(arguments):
                raise invalid(
                    "ERR_VALUE_TOO_DEEP",
                    f"script turn {index}, tool call {call_index}: arguments are nested deeper than "
                    f"{MAX_DEPTH} levels",
                    field="model.script",
                    turn=index,
                )
        counts = () if turn.usage is None else dataclasses.astuple(turn.usage)
        if any(count < 0 for count in counts):
            raise invalid(
                "ERR_INVALID_SCRIPT",
                f"script turn {index}: usage token counts must not be negative",
                field="model.script",
                turn=index,
            )


def load_script_file(path: str) -> list[ScriptedTurn]:
    text = Path(path).read_text(encoding="utf-8")
    doc = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    turns = doc.get("turns") if isinstance(doc, dict) else doc
    if not isinstance(turns, list):
        raise ValueError(f"script file {path!r} must hold a list of turns under 'turns'")
    script = [ScriptedTurn.from_json(t) for t in turns]
    validate_script(script)
    return script


def resolve_default_model(config: EngineConfig, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    env = os.environ if env is None else env
    provider = config.model.provider
    if provider == "auto":
        if env.get(api_key_env(config, "anthropic")):
            provider = "anthropic"
        elif env.get(api_key_env(config, "openai")):
            provider = "openai"
        else:
            provider = "scripted"
    return provider, config.model.name or default_model_name(provider)


def provider_config(config: EngineConfig, provider: str) -> ProviderConfig:
    settings: ProviderConfig | None = getattr(config.model, provider, None)
    return settings if isinstance(settings, ProviderConfig) else ProviderConfig()


def api_key_env(config: EngineConfig, provider: str) -> str:
    """The environment variable holding ``provider``'s API key."""
    return provider_config(config, provider).api_key_env or _HTTP_PROVIDERS[provider][1]


def provider_base_url(config: EngineConfig, default_provider: str, provider: str) -> str | None:
    """Where ``provider`` is reached: its own base_url, else ``model.base_url`` if it is the
    default provider (that setting names the default provider's endpoint), else its public one."""
    own = provider_config(config, provider).base_url
    if own:
        return own
    if provider == default_provider and config.model.base_url:
        return config.model.base_url
    return None


Price = tuple[float, float, float, float]


def model_price(config: EngineConfig, default_provider: str, provider: str, name: str) -> Price | None:
    """USD per million input, output, cache-read and cache-write tokens of ``provider:name``;
    None when unknown. Without cache prices, cached tokens cost what other input does."""
    listed = provider_config(config, provider).prices.get(name)
    if listed is not None:
        return (
            (listed[0], listed[1], listed[2], listed[3])
            if len(listed) == 4
            else (*listed[:2], *listed[:1] * 2)
        )
    legacy = (config.model.input_cost_per_mtok, config.model.output_cost_per_mtok)
    if provider == default_provider and legacy != (None, None):
        return legacy[0] or 0.0, legacy[1] or 0.0, legacy[0] or 0.0, legacy[0] or 0.0
    if provider == "scripted":
        return 0.0, 0.0, 0.0, 0.0  # offline and free
    return None


# Context windows of well-known models, by name prefix (longest first); others need configuring.
_CONTEXT_WINDOWS: tuple[tuple[str, int], ...] = (
    ("gpt-4o", 128_000),
    ("gpt-4.1", 1_047_576),
    ("gpt-5", 400_000),
    ("o1", 200_000),
    ("o3", 200_000),
    ("o4", 200_000),
    ("claude", 200_000),
)


# What a run may set as its context window (ModelSpec.context_window_tokens; 0 = not set).
MIN_RUN_CONTEXT_WINDOW = 256
MAX_RUN_CONTEXT_WINDOW = 10_000_000


def check_run_context_window(tokens: int) -> None:
    """Refuse a run's context window outside sane bounds (ERR_INVALID_REQUEST)."""
    if tokens and not MIN_RUN_CONTEXT_WINDOW <= tokens <= MAX_RUN_CONTEXT_WINDOW:
        raise invalid(
            "ERR_INVALID_REQUEST",
            f"model.context_window_tokens must be 0 (the model's own) or between "
            f"{MIN_RUN_CONTEXT_WINDOW:,} and {MAX_RUN_CONTEXT_WINDOW:,}",
            field="model.context_window_tokens",
            value=tokens,
        )


def context_window(config: EngineConfig, provider: str, name: str, per_run: int = 0) -> int:
    """The context window, in tokens, compaction keeps ``provider:name``'s requests inside;
    0 = unknown (no compaction): the run's own setting, the provider's table, the engine's
    default, then the window of a well-known model. A run's own setting can narrow the
    window of a model whose window is known (the provider's table, a well-known model), never
    widen it: past it the provider refuses the request."""
    known = provider_config(config, provider).context_window_tokens.get(name) or _well_known(provider, name)
    if per_run:
        per_run = min(max(per_run, MIN_RUN_CONTEXT_WINDOW), MAX_RUN_CONTEXT_WINDOW)  # a spec stored before
        return min(per_run, known) if known else per_run
    listed = provider_config(config, provider).context_window_tokens.get(name)
    if listed:
        return listed
    if config.model.context_window_tokens:
        return config.model.context_window_tokens
    return known


def _well_known(provider: str, name: str) -> int:
    if provider == "scripted":
        return 0
    lowered = name.lower()
    return next((size for prefix, size in _CONTEXT_WINDOWS if lowered.startswith(prefix)), 0)


# Bare model names whose provider is plain from the name (as LangChain's init_chat_model infers).
_NAME_PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("claude", "anthropic"),
)


def infer_provider(model_name: str) -> str | None:
    """The provider a bare model name belongs to, when a well-known prefix says; else None."""
    name = model_name.lower()
    for prefix, provider in _NAME_PREFIXES:
        if name.startswith(prefix):
            return provider
    return None


def default_model_name(provider: str) -> str:
    return {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o-mini"}.get(provider, "script")


def default_model_factory(config: EngineConfig) -> ModelFactory:
    """Build real adapters; one per (provider, model) shared across runs (connection pooling).

    Each provider has its own endpoint and key: a run choosing another provider than the
    default never reaches the default provider's endpoint or sees its key. The factory's
    ``aclose`` closes every adapter it built (the engine calls it when it stops).
    """
    return _Adapters(config)


class _Adapters:
    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._cache: dict[tuple[str, str], ModelAdapter] = {}
        self._retry = RetryPolicy(max_attempts=config.model.max_attempts)
        self._default_provider, _ = resolve_default_model(config)

    def __call__(self, provider: str, name: str) -> ModelAdapter:
        adapter = self._cache.get((provider, name))
        if adapter is not None:
            return adapter
        entry = _HTTP_PROVIDERS.get(provider)
        if entry is None:
            raise invalid("ERR_INVALID_REQUEST", f"unknown model provider {provider!r}")
        adapter_class, _ = entry
        adapter = adapter_class(
            api_key=os.environ.get(api_key_env(self._config, provider), ""),
            model=name,
            base_url=provider_base_url(self._config, self._default_provider, provider),
            retry=self._retry,
        )
        self._cache[(provider, name)] = adapter
        return adapter

    async def aclose(self) -> None:
        adapters, self._cache = list(self._cache.values()), {}
        for adapter in adapters:
            await adapter.aclose()

"""Configuration precedence, validation and API-key files."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_service import ConfigError, EngineConfig, load_config
from engine_service.core._config import is_loopback, load_api_keys
from engine_service.tools._registry import load_tool


def test_flags_override_env_override_file(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text('listen = "127.0.0.1:1111"\nstorage = "/from/file"\n[model]\nprovider = "openai"\n')
    env = {
        "MACHINA_STORAGE": "/from/env",
        "MACHINA_MODEL_PROVIDER": "anthropic",
        "MACHINA_TOOLS_DISABLED": "a, b",
    }
    config: EngineConfig = load_config(str(path), env=env, overrides={"storage": "/from/flag"})
    assert config.listen == "127.0.0.1:1111"
    assert config.storage == "/from/flag"
    assert config.model.provider == "anthropic"
    assert config.tools.disabled == ["a", "b"]


def test_defaults() -> None:
    config: EngineConfig = load_config(env={})
    assert config.listen == "127.0.0.1:50051"
    assert config.storage == "./.machina"
    assert config.model.provider == "auto"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"MACHINA_LISTEN": "nonsense"}, "listen"),
        ({"MACHINA_MAX_TURNS": "0"}, "max_turns"),
        ({"MACHINA_MODEL_PROVIDER": "gpt"}, "model.provider"),
        ({"MACHINA_BOGUS": "1"}, None),  # unknown env vars are ignored
    ],
)
def test_bad_values_are_clear(env: dict[str, str], problem: str | None) -> None:
    if problem is None:
        load_config(env=env)
        return
    with pytest.raises(ConfigError, match=problem):
        load_config(env=env)


def test_unknown_file_keys_and_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("lisen = 'x'\n")
    with pytest.raises(ConfigError, match="lisen"):
        load_config(str(path), env={})
    path.write_text("= broken")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(path), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), env={})


def test_api_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('"sk-alice-0001" = "alice"\n"sk-bob-000002" = { workspace = "bob", name = "bob-ci" }\n')
    keys = load_api_keys(str(path))
    assert keys["sk-alice-0001"].workspace_id == "alice"
    assert keys["sk-alice-0001"].identity.startswith("key:")
    assert "sk-alice" not in keys["sk-alice-0001"].identity
    assert keys["sk-bob-000002"].identity == "bob-ci"
    path.write_text('"short" = "ws"\n')
    with pytest.raises(ConfigError, match="shorter"):
        load_api_keys(str(path))
    path.write_text('"sk-long-enough" = "../escape"\n')
    with pytest.raises(ConfigError, match="invalid workspace"):
        load_api_keys(str(path))


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1:50051")
    assert is_loopback("localhost:1")
    assert is_loopback("[::1]:1")
    assert not is_loopback("0.0.0.0:50051")


def test_custom_tool_by_import_path() -> None:
    tool = load_tool("tests.tools:double")
    assert tool.name == "double"
    assert tool.input_schema["required"] == ["x"]
    with pytest.raises(Exception, match=r"package\.module:name"):
        load_tool("tests.tools.double")
    with pytest.raises(Exception, match="cannot load"):
        load_tool("tests.tools:nope")


def test_runner_and_webhook_secrets_per_workspace(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text('[workspace_webhook_secrets.acme]\nhook = "acme-own"\nacme_only = "a1"\n')
    env = {
        "MACHINA_RUNNER_SECRET": "shared-runner",
        "MACHINA_RUNNER_SECRETS": "acme=acme-runner,globex=globex-runner",
        "MACHINA_WEBHOOK_SECRETS": "hook=shared-hook",
        "HOOK_FROM_ENV": "never-read",
    }
    config: EngineConfig = load_config(str(path), env=env)
    assert config.runner_secret_for("acme") == "acme-runner"
    assert config.runner_secret_for("initech") == "shared-runner"
    assert config.webhook_secret("acme", "hook") == "acme-own"  # the workspace's own wins
    assert config.webhook_secret("globex", "hook") == "shared-hook"
    assert config.webhook_secret("globex", "acme_only") is None  # another workspace's
    assert config.webhook_secret("acme", "HOOK_FROM_ENV") is None  # never the environment
    assert config.webhook_secret("acme", "MACHINA_RUNNER_SECRET") is None
    config.check_runner_secrets()
    with pytest.raises(ConfigError, match="runner_secret"):
        load_config(env={"MACHINA_RUNNER_URL": "http://127.0.0.1:9/continue"}).check_runner_secrets()
    alone: EngineConfig = load_config(
        env={"MACHINA_RUNNER_SECRETS": "acme=x"}, overrides={"runner_urls": {"acme": "u", "b": "v"}}
    )
    with pytest.raises(ConfigError, match=r"\['b'\]"):
        alone.check_runner_secrets()

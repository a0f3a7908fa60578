"""What a process checks before it serves: the model provider's key and the storage.

Each operator mistake becomes one ``ConfigError`` naming the setting and what to do; the
entry points print it on one line and exit 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Mapping

from engine_service.core._config import ConfigError, EngineConfig
from engine_service.storage._local import LocalStorage, open_storage
from engine_service.storage._protocol import Storage, StorageCredentialsMissing, storage_fault

# How long the startup storage check (and each later reachability probe) may take.
log = logging.getLogger("machina.engine")
STORAGE_CHECK_TIMEOUT_S = 10.0

_STORAGE_SETTING = "MACHINA_STORAGE (--storage)"


def check_model_key(config: EngineConfig, env: Mapping[str, str] | None = None) -> None:
    """An explicitly chosen HTTP provider needs its API key in the environment."""
    from engine_service.models._select import api_key_env

    provider = config.model.provider
    if provider not in ("openai", "anthropic"):
        return
    variable = api_key_env(config, provider)
    if not (os.environ if env is None else env).get(variable, "").strip():
        raise ConfigError(
            f"the model provider is {provider!r} (MACHINA_MODEL_PROVIDER) but {variable} is not set: "
            f"set {variable}, or choose another provider"
        )


def open_configured_storage(config: EngineConfig) -> Storage:
    """``open_storage`` with a bad URL or an unusable directory as a ConfigError."""
    try:
        return open_storage(config.storage, fsync=config.fsync)
    except ValueError as exc:
        raise ConfigError(f"storage {config.storage!r}: {exc} ({_STORAGE_SETTING})") from None
    except OSError as exc:
        raise ConfigError(_unusable_directory(config.storage, exc)) from None


def _unusable_directory(url: str, exc: OSError) -> str:
    return (
        f"storage {url!r} is not a usable directory ({exc.strerror or type(exc).__name__}): "
        f"set {_STORAGE_SETTING} to a directory this process can create and write"
    )


async def check_storage(storage: Storage, url: str, timeout: float = STORAGE_CHECK_TIMEOUT_S) -> None:
    """The storage answers an authenticated read (and a local directory takes a write)."""
    if isinstance(storage, LocalStorage):
        probe = storage.root / f".machina-probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(_unusable_directory(url, exc)) from None
    try:
        await asyncio.wait_for(storage.list_workspaces(), timeout)
    except Exception as exc:
        transient = isinstance(exc, TimeoutError) or storage_fault(exc)
        if transient and not isinstance(exc, StorageCredentialsMissing):
            # Down for now (a 5xx, throttling, no answer): not a mistake in the settings. The
            # engine serves NOT_SERVING until the storage answers (watch_storage_health).
            log.warning("storage %s does not answer yet (%s); health is NOT_SERVING until it does", url,
                        _describe(exc, timeout))  # fmt: skip
            return
        raise ConfigError(f"storage {url!r} is not reachable: {_describe(exc, timeout)}") from None


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s: check {_STORAGE_SETTING} and the endpoint (AWS_ENDPOINT_URL)"
    return f"{exc or type(exc).__name__}"


async def storage_problem(storage: Storage, timeout: float = STORAGE_CHECK_TIMEOUT_S) -> str:
    """'' when the storage answers a cheap listing within ``timeout``, else what went wrong."""
    try:
        await asyncio.wait_for(storage.list_workspaces(), timeout)
    except TimeoutError:
        return f"no answer within {timeout:g}s: check {_STORAGE_SETTING} and the endpoint (AWS_ENDPOINT_URL)"
    except Exception as exc:
        return f"{exc or type(exc).__name__}"
    return ""

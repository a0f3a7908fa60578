"""ApiCall's credentials: looked up by reference (env, a custom resolver), never shown: every known
value is scrubbed from what ApiCall returns, emits or logs."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from engine_service.core._errors import EngineError
from engine_service.tools._apicall_config import (
    DEFAULT_METHODS as DEFAULT_METHODS,
)
from engine_service.tools._apicall_config import (
    METHODS as METHODS,
)
from engine_service.tools._apicall_config import (
    AnyAuth as AnyAuth,
)
from engine_service.tools._apicall_config import (
    ApiAuth as ApiAuth,
)
from engine_service.tools._apicall_config import (
    ApiConfig as ApiConfig,
)
from engine_service.tools._apicall_config import (
    ApiService as ApiService,
)
from engine_service.tools._apicall_config import (
    BasicAuth as BasicAuth,
)
from engine_service.tools._apicall_config import (
    BearerAuth as BearerAuth,
)
from engine_service.tools._apicall_config import (
    CustomAuth as CustomAuth,
)
from engine_service.tools._apicall_config import (
    HeaderAuth as HeaderAuth,
)
from engine_service.tools._apicall_config import (
    NoAuth as NoAuth,
)
from engine_service.tools._registry import _import_attr

REDACTED = "[REDACTED]"


@dataclass(frozen=True, slots=True)
class AuthContext:
    """What a custom ``resolve_auth`` knows about the request it signs and who asks for it.

    ``per_run`` is True for a service the run's caller defined (its ``base_url`` is the
    caller's choice): mint nothing for it that the workspace may not hold.
    """

    service: str
    method: str
    path: str
    workspace_id: str = ""
    run_id: str = ""
    base_url: str = ""
    per_run: bool = False


ResolveAuth = Callable[[CustomAuth, AuthContext], Mapping[str, str] | Awaitable[Mapping[str, str]]]


EnvLookup = Callable[[str], str | None]


def env_lookup_from(*envs: Mapping[str, SecretStr] | None) -> EnvLookup:
    """A lookup reading the given env maps in order (first hit wins)."""

    def lookup(ref: str) -> str | None:
        for env in envs:
            if env and ref in env:
                return env[ref].get_secret_value()
        return None

    return lookup


def no_env(ref: str) -> str | None:
    return None


def load_resolve_auth(path: str) -> ResolveAuth:
    """Import ``package.module:function``."""
    fn = _import_attr(path, "resolve_auth")
    if not callable(fn):
        raise EngineError("ERR_CONFIG", f"resolve_auth {path!r} is not callable")
    resolver: ResolveAuth = fn
    return resolver


class Scrubber:
    """Replaces every known secret value (longest first) with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def add(self, value: str) -> None:
        # "Bearer abc" → also "abc": an API may echo the bare token (httpbin /bearer does).
        found = [value, *value.split(None, 1)[1:]]
        self.secrets = sorted(
            {*self.secrets, *(v.strip() for v in found if v.strip())}, key=len, reverse=True
        )

    def text(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        return value


def credential_refs(auth: AnyAuth) -> list[str]:
    if isinstance(auth, BearerAuth):
        return [auth.token_ref]
    if isinstance(auth, HeaderAuth):
        return [auth.value_ref]
    if isinstance(auth, BasicAuth):
        return [auth.user_ref, auth.pass_ref]
    return []


def basic_credentials(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def known_secrets(services: Iterable[ApiService], env_lookup: EnvLookup) -> list[str]:
    """Every credential value the services' refs resolve to now, plus basic auth's base64 form."""
    found: list[str] = []
    for service in services:
        values = [v for v in map(env_lookup, credential_refs(service.auth)) if v]
        found += values
        if isinstance(service.auth, BasicAuth) and len(values) == 2:
            found.append(basic_credentials(*values))
    return found

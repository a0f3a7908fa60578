"""ApiCall's settings: the services the model may call, their auth by reference, and the ``api`` block.

Configuration only (pydantic models and the rails they check), so engine settings can load an
``api`` block without importing the ApiCall tool itself."""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeAlias
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from engine_service.core._regex import PatternError, check_patterns

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
DEFAULT_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the model may never set: credentials, routing and message framing.
RESERVED_HEADERS = frozenset(("authorization", "proxy-authorization", "cookie", "host", "content-length",
                              "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
                              "expect"))  # fmt: skip


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NoAuth(_Frozen):
    type: Literal["none"] = "none"


class BearerAuth(_Frozen):
    type: Literal["bearer"]
    token_ref: str = Field(min_length=1)


class HeaderAuth(_Frozen):
    type: Literal["header"]
    name: str = Field(pattern=HEADER_NAME.pattern)
    value_ref: str = Field(min_length=1)


class BasicAuth(_Frozen):
    type: Literal["basic"]
    user_ref: str = Field(min_length=1)
    pass_ref: str = Field(min_length=1)


class CustomAuth(_Frozen):
    type: Literal["custom"]
    id: str = Field(min_length=1)


AnyAuth: TypeAlias = NoAuth | BearerAuth | HeaderAuth | BasicAuth | CustomAuth


ApiAuth: TypeAlias = Annotated[AnyAuth, Field(discriminator="type")]


class ApiService(_Frozen):
    """One HTTP service the model may call; secrets are named by ref, never inlined."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    base_url: str
    auth: ApiAuth = NoAuth()
    # RE2 regexes (linear time), full-matched against the normalised path relative to base_url.
    allowed_paths: list[str] | None = None
    allowed_methods: list[str] | None = None
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_response_bytes: int = Field(1 << 20, gt=0)
    timeout_s: float = Field(30.0, gt=0)
    # Fixed, non-secret headers (e.g. Accept, an API version); the model cannot override them.
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an absolute http:// or https:// URL")
        # Userinfo would put a credential in the tool description; query/fragment break path joins.
        if "@" in parts.netloc or parts.query or parts.fragment:
            raise ValueError("base_url must not contain credentials, a query or a fragment")
        return value.rstrip("/")

    @field_validator("allowed_paths")
    @classmethod
    def _check_paths(cls, value: list[str] | None) -> list[str] | None:
        try:
            check_patterns(value)
        except PatternError as exc:
            raise ValueError(f"allowed_paths: {exc}") from None
        return value

    @field_validator("allowed_methods")
    @classmethod
    def _check_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        upper = [m.upper() for m in value]
        if bad := [m for m in upper if m not in METHODS]:
            raise ValueError(f"unsupported methods {bad}; choose from {list(METHODS)}")
        return upper

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, val in value.items():
            if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS or has_ctl(val):
                raise ValueError(f"fixed header {name!r} is not allowed (credentials belong in auth)")
        return value

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.allowed_methods) if self.allowed_methods is not None else DEFAULT_METHODS


class ApiConfig(_Frozen):
    """The ``api`` block of engine config or of a run: services, secret env and a custom resolver."""

    services: list[ApiService] = Field(default_factory=list)
    env: dict[str, SecretStr] = Field(default_factory=dict)
    resolve_auth: str | None = Field(None, pattern=r"^[\w.]+:\w+$")
    # Metering hooks by import path, called with {service, method, path[, status, latency_ms, bytes_in]}.
    on_request: str | None = Field(None, pattern=r"^[\w.]+:\w+$")
    on_response: str | None = Field(None, pattern=r"^[\w.]+:\w+$")
    # Engine config only: the custom auth ids a run's own services may name (exact match).
    # Empty (the default) = per-run services use per-run credentials only; resolve_auth then
    # never runs for a service a tenant defined.
    per_run_custom_auth_ids: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> ApiConfig:
        # Case-insensitively: "GitHub" beside "github" would let one pass for the other.
        names = [s.name.lower() for s in self.services]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"service names must be unique (ignoring case): {dupes}")
        return self


def has_ctl(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)

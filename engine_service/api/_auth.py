"""Who is calling: API keys to principals (workspace and identity)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from engine_service.core import _metrics as metrics
from engine_service.core._errors import EngineError, ErrorKind
from engine_service.core._types import Principal

log = logging.getLogger("machina.engine")


def key_fingerprint(token: str) -> str:
    """What a log says about a presented key: the first 12 hex digits of its SHA-256 (as decisions
    name a key without a name), never the key."""
    return hashlib.sha256(token.strip().encode()).hexdigest()[:12]


def log_refused(service: str, why: str, token: str, *, digest: bytes = b"") -> None:
    """One warning for a refused request, naming the key by its fingerprint only (from the key,
    or from its SHA-256 ``digest`` when only that is at hand)."""
    metrics.AUTH_REFUSED.inc(service)
    fingerprint = digest.hex()[:12] if digest else key_fingerprint(token) if token.strip() else "none"
    log.warning(
        "refused a %s request: %s (key fingerprint %s)", service, why, fingerprint,
        extra={"auth": "refused", "key_fingerprint": fingerprint, "service": service},
    )  # fmt: skip


# Who decides, resumes or cancels when the engine has no API keys: it then listens on loopback
# only, so the caller is someone on this machine.
LOCAL_IDENTITY = "local-user"


class Authenticator:
    """Maps ``authorization: Bearer <key>`` to a workspace.

    Keys are looked up by their SHA-256 so lookup time does not depend on how
    much of a guessed key is right. With no keys configured every caller is
    the ``default`` workspace.
    """

    def __init__(self, keys: Mapping[str, Principal] | None) -> None:
        self._by_digest = {hashlib.sha256(k.encode()).digest(): p for k, p in (keys or {}).items()}
        self.enabled = bool(self._by_digest)

    def principal(self, metadata: Any) -> Principal:
        if not self.enabled:
            return Principal("default", LOCAL_IDENTITY)
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            log_refused("engine", "no bearer key", token)
            raise EngineError(
                "ERR_UNAUTHENTICATED",
                "missing 'authorization: Bearer <api key>' metadata",
                kind=ErrorKind.UNAUTHENTICATED,
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        log_refused("engine", "unknown key", token)
        raise EngineError("ERR_UNAUTHENTICATED", "the API key is not valid", kind=ErrorKind.UNAUTHENTICATED)

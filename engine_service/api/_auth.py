"""Who is calling: API keys to principals (workspace and identity)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from engine_service.core._errors import EngineError, ErrorKind
from engine_service.core._types import Principal

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
            raise EngineError(
                "ERR_UNAUTHENTICATED",
                "missing 'authorization: Bearer <api key>' metadata",
                kind=ErrorKind.UNAUTHENTICATED,
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise EngineError("ERR_UNAUTHENTICATED", "the API key is not valid", kind=ErrorKind.UNAUTHENTICATED)

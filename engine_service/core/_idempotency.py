"""Request ids (AIP-155): a retry of the same request is answered, a different request is refused.

A ``request_id`` is stored with a fingerprint of the request it came with: a SHA-256 over the
request's canonical JSON, secrets left out (per-run ``env`` values are never part of it). A later
request with that id and the same fingerprint is a retry and gets the first answer; one with
another fingerprint is a client bug (a reused id) and fails ``ERR_REQUEST_ID_REUSED`` rather than
silently getting the first request's run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine_service.core._errors import precondition


def fingerprint(*parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8", "replace")).hexdigest()


def check_same_request(request_id: str, stored: str | None, current: str, rpc: str) -> None:
    """``ERR_REQUEST_ID_REUSED`` unless ``current`` matches the fingerprint stored with ``request_id``.

    ``stored`` is None (or empty) for ids recorded before fingerprints were kept: those count as
    the same request.
    """
    if stored and stored != current:
        raise precondition(
            "ERR_REQUEST_ID_REUSED",
            f"request_id {request_id!r} was already used for a different {rpc} request; "
            "a retry must repeat the request exactly, a new request needs a new request_id",
            request_id=request_id,
            rpc=rpc,
        )

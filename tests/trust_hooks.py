"""An operator's ``resolve_auth`` and metering hooks, loaded by import path into a real engine process.

Each call is appended as a JSON line to the file named by ``MACHINA_TEST_HOOK_LOG``, so the test
can read what the engine told them (who asked, for which service).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from engine_service.tools._apicall import AuthContext, CustomAuth

# What the operator's resolver mints for its own services: an engine-held credential.
ENGINE_MINTED = "eng-CANARY-minted-8a1f"
# The one custom id the test engine allows per-run services: minted per workspace, for tenants.
TENANT_ID = "tenant-oauth"


def _log(kind: str, payload: dict[str, Any]) -> None:
    path = os.environ.get("MACHINA_TEST_HOOK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as sink:
            sink.write(json.dumps({"kind": kind, **payload}) + "\n")


def resolve_auth(auth: CustomAuth, ctx: AuthContext) -> dict[str, str]:
    _log("resolve_auth", {"id": auth.id, **dataclasses.asdict(ctx)})
    # Deliberately naive (it trusts whoever asks), so the engine's own checks are what is tested.
    if auth.id == TENANT_ID:
        return {"Authorization": f"Bearer tenant-token-for-{ctx.workspace_id}"}
    return {"Authorization": f"Bearer {ENGINE_MINTED}"}


def on_request(payload: dict[str, Any]) -> None:
    _log("on_request", payload)


def on_response(payload: dict[str, Any]) -> None:
    _log("on_response", payload)


def read(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as source:
            return [json.loads(line) for line in source if line.strip()]
    except FileNotFoundError:
        return []

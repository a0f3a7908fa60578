"""The runner's core: accept a handed-off run and continue it in the background.

Shared by the HTTP shim and the gRPC service so both have the same semantics.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from engine_service import Engine, EngineError, ErrorKind, Principal
from engine_service.api.serving import is_valid_id, log_refused

log = logging.getLogger("machina.runner")


class Rejected(EngineError):
    """A /continue request the runner will not take: an engine error kind, a reason, a message.

    The gRPC service answers it like the engine answers its errors (``set_error``); the HTTP
    shim answers ``http_status(kind)``.
    """

    def __init__(self, kind: ErrorKind, reason: str, message: str) -> None:
        super().__init__(reason, message, kind=kind)


# The one mapping from the engine's error kinds to the shim's HTTP statuses.
_HTTP_STATUS: Mapping[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.FAILED_PRECONDITION: 409,
    ErrorKind.ABORTED: 409,
    ErrorKind.RESOURCE_EXHAUSTED: 413,
    ErrorKind.UNAVAILABLE: 503,
}


def http_status(kind: ErrorKind) -> int:
    """The HTTP status the shim answers for an error of ``kind``."""
    return _HTTP_STATUS.get(kind, 500)


class Runner:
    """Continues handed-off runs; a request must carry the handoff secret of the run's workspace.

    ``secrets`` maps workspaces to their own secret; ``default_secret`` ("" = none) serves every
    workspace without one. A workspace with its own secret never accepts the default one.
    """

    def __init__(
        self,
        engine: Engine,
        default_secret: str,
        default_workspace: str,
        secrets: Mapping[str, str] | None = None,
        *,
        hold_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self._hold_s = hold_s  # test hook (test_runner_hold_s): queue accepted runs this long
        self._default_digest = _digest(default_secret) if default_secret else None
        self._digests = {ws: _digest(secret) for ws, secret in (secrets or {}).items() if secret}
        self._default_workspace = default_workspace
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = True

    def check_bearer(self, header: str | None) -> bytes:
        """Constant-time check that ``Authorization: Bearer <token>`` is one of the secrets.

        Returns the token's digest for ``accept``, which checks it is the workspace's own.
        """
        scheme, _, token = (header or "").partition(" ")
        presented = _digest(token.strip())
        # Compare every digest (equal lengths) so timing says nothing about which matched.
        known = [d for d in (self._default_digest, *self._digests.values()) if d is not None]
        matched = False
        for digest in known:
            matched |= hmac.compare_digest(presented, digest)
        if not (matched and scheme.lower() == "bearer"):
            log_refused("runner", "bad or missing bearer token", token)
            raise Rejected(ErrorKind.UNAUTHENTICATED, "ERR_UNAUTHENTICATED", "bad or missing bearer token")
        return presented

    def _check_workspace(self, presented: bytes, workspace: str) -> None:
        expected = self._digests.get(workspace, self._default_digest)
        if expected is None or not hmac.compare_digest(presented, expected):
            log_refused("runner", f"the token is not workspace {workspace!r}'s", "", digest=presented)
            # The same answer as an unknown token: which workspaces a secret serves stays private.
            raise Rejected(ErrorKind.UNAUTHENTICATED, "ERR_UNAUTHENTICATED", "bad or missing bearer token")

    async def accept(self, run_id: Any, workspace_id: Any = None, *, presented: bytes) -> str:
        """Validate and start continuing ``run_id``; returns the run id. Raises Rejected.

        ``presented`` is what ``check_bearer`` returned: the secret must be the workspace's.
        """
        if not self.accepting:
            raise Rejected(ErrorKind.UNAVAILABLE, "ERR_SHUTTING_DOWN", "the runner is shutting down")
        if not isinstance(run_id, str) or not is_valid_id(run_id):
            raise Rejected(
                ErrorKind.INVALID_ARGUMENT,
                "ERR_INVALID_ID",
                "runId must be a string matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
            )
        workspace = self._default_workspace if workspace_id in (None, "") else workspace_id
        if not isinstance(workspace, str) or not is_valid_id(workspace):
            raise Rejected(ErrorKind.INVALID_ARGUMENT, "ERR_INVALID_ID", "workspaceId must be a valid id")
        # The run is read from storage under this workspace only, so the secret binds the run too.
        self._check_workspace(presented, workspace)
        principal = Principal(workspace, "runner")
        try:
            if self._hold_s:
                await self.engine.check_handed_off(principal, run_id)
            else:
                await self.engine.continue_handoff(principal, run_id)
        except EngineError as error:
            if error.reason == "ERR_RUN_NOT_FOUND":
                raise Rejected(ErrorKind.NOT_FOUND, error.reason, error.message) from None
            if error.reason == "ERR_RUN_NOT_HANDED_OFF" and error.metadata.get("state") == "RUNNING":
                # Posted twice (e.g. a retry after a timeout): it is already being continued.
                log.info("run %s is already being continued", run_id, extra={"run_id": run_id})
                return run_id
            raise Rejected(ErrorKind.FAILED_PRECONDITION, error.reason, error.message) from None
        if self._hold_s:
            task = asyncio.create_task(self._continue_later(principal, run_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            log.info("queued run %s", run_id, extra={"run_id": run_id, "workspace": workspace})
            return run_id
        log.info("continuing run %s", run_id, extra={"run_id": run_id, "workspace": workspace})
        return run_id

    async def _continue_later(self, principal: Principal, run_id: str) -> None:
        await asyncio.sleep(self._hold_s)
        try:
            await self.engine.continue_handoff(principal, run_id)
        except EngineError as error:
            log.warning("queued run %s was not continued: %s", run_id, error.reason, extra={"run_id": run_id})
            return
        log.info("continuing run %s", run_id, extra={"run_id": run_id})

    async def close(self, grace: float) -> None:
        self.accepting = False
        await self.engine.close(grace)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()

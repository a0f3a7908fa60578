"""The runner's core: accept a handed-off run and continue it in the background.

Shared by the HTTP shim and the gRPC service so both have the same semantics.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from typing import Any

from engine_service import Engine, EngineError, Principal
from engine_service._ids import is_valid_id

log = logging.getLogger("machina.runner")


class Rejected(Exception):
    """A /continue request the runner will not take; ``status`` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Runner:
    def __init__(self, engine: Engine, secret: str, default_workspace: str, *, hold_s: float = 0.0) -> None:
        self.engine = engine
        self._hold_s = hold_s  # test hook (test_runner_hold_s): queue accepted runs this long
        self._secret_digest = hashlib.sha256(secret.encode()).digest()
        self._default_workspace = default_workspace
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = True

    def check_bearer(self, header: str | None) -> None:
        """Constant-time check of ``Authorization: Bearer <secret>``."""
        scheme, _, token = (header or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        # Compare digests of equal length so timing says nothing about the secret.
        if not (hmac.compare_digest(presented, self._secret_digest) and scheme.lower() == "bearer"):
            raise Rejected(401, "ERR_UNAUTHENTICATED", "bad or missing bearer token")

    async def accept(self, run_id: Any, workspace_id: Any = None) -> str:
        """Validate and start continuing ``run_id``; returns the run id. Raises Rejected."""
        if not self.accepting:
            raise Rejected(503, "ERR_SHUTTING_DOWN", "the runner is shutting down")
        if not isinstance(run_id, str) or not is_valid_id(run_id):
            raise Rejected(
                400, "ERR_INVALID_ID", "runId must be a string matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
            )
        workspace = self._default_workspace if workspace_id in (None, "") else workspace_id
        if not isinstance(workspace, str) or not is_valid_id(workspace):
            raise Rejected(400, "ERR_INVALID_ID", "workspaceId must be a valid id")
        principal = Principal(workspace, "runner")
        try:
            if self._hold_s:
                await self.engine.check_handed_off(principal, run_id)
            else:
                await self.engine.continue_handoff(principal, run_id)
        except EngineError as error:
            if error.code == "ERR_RUN_NOT_FOUND":
                raise Rejected(404, error.code, error.message) from None
            if error.code == "ERR_RUN_NOT_HANDED_OFF" and error.metadata.get("state") == "RUNNING":
                # Posted twice (e.g. a retry after a timeout): it is already being continued.
                log.info("run %s is already being continued", run_id, extra={"run_id": run_id})
                return run_id
            raise Rejected(409, error.code, error.message) from None
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
            log.warning("queued run %s was not continued: %s", run_id, error.code, extra={"run_id": run_id})
            return
        log.info("continuing run %s", run_id, extra={"run_id": run_id})

    async def close(self, grace: float) -> None:
        self.accepting = False
        await self.engine.close(grace)

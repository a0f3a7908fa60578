"""The runner handoff client: how an engine asks a workspace's runner to continue a run."""

from __future__ import annotations

import logging

import httpx

from engine_service.core import _telemetry as telemetry
from engine_service.core._config import EngineConfig
from engine_service.core._dispatch import RunnerUnreachable

log = logging.getLogger("machina.engine")


class RunnerClient:
    """POSTs handoffs to the runner configured for each workspace (operator config only)."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._http: httpx.AsyncClient | None = None

    def url(self, ws: str) -> str:
        # Operator config only (no request can name a runner), so the egress policy does not
        # apply: a runner usually lives on the engine's own host or private network.
        return self._config.runner_urls.get(ws, self._config.runner_url)

    async def post(self, ws: str, run_id: str) -> None:
        """POST ``{"runId": ...}`` to the workspace's runner; RunnerUnreachable unless it answers 2xx."""
        url = self.url(ws)
        secret = self._config.runner_secret_for(ws)
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self._config.runner_timeout_s, connect=2.0),
                verify=self._config.runner_tls_verify(),  # runner_ca_file: an https runner with a private CA
            )
        headers = {"Authorization": f"Bearer {secret}"}
        telemetry.inject(headers)  # the runner's spans join the run's trace
        try:
            response = await self._http.post(url, json={"runId": run_id, "workspaceId": ws}, headers=headers)
        except httpx.HTTPError as exc:
            # The exception text can carry the request; only its kind is reported.
            log.warning(
                "runner handoff of %s failed: %s", run_id, type(exc).__name__, extra={"run_id": run_id}
            )
            raise RunnerUnreachable(f"{type(exc).__name__} posting to the runner") from None
        if not 200 <= response.status_code < 300:
            log.warning(
                "runner refused %s with HTTP %d", run_id, response.status_code, extra={"run_id": run_id}
            )
            raise RunnerUnreachable(f"the runner answered HTTP {response.status_code}")
        log.info("run %s handed off to the runner", run_id, extra={"run_id": run_id})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

"""gRPC face of the runner: machina.runner.v1.RunnerService (+ health and reflection)."""

from __future__ import annotations

from typing import Any

import grpc

from engine_service.api.serving import add_service, serve_with_health, set_error
from machina.runner.v1 import runner_service_pb2 as pb
from machina.runner.v1 import runner_service_pb2_grpc as pb_grpc
from runner_service._runner import Rejected, Runner

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RunnerService"].full_name


class RunnerServicer(pb_grpc.RunnerServiceServicer):
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def Continue(self, request: pb.ContinueRequest, context: Any) -> pb.ContinueResponse:
        try:
            metadata = dict(context.invocation_metadata() or ())
            presented = self._runner.check_bearer(metadata.get("authorization"))
            await self._runner.accept(request.run_id, request.workspace_id, presented=presented)
        except Rejected as rejected:
            set_error(context, rejected)
            # The status set above is what the caller gets; this body is not sent.
            return pb.ContinueResponse(accepted=False)
        return pb.ContinueResponse(accepted=True)


async def start_grpc(
    runner: Runner, listen: str, *, tls: tuple[bytes, bytes] | None = None
) -> tuple[Any, int, Any]:
    """Start RunnerService + health + reflection; returns (server, port, health servicer).

    ``tls`` is (PEM private key, PEM certificate chain); None serves plaintext.
    """
    server = grpc.aio.server()
    # Requests are parsed by us, so bytes that are not a message get INVALID_ARGUMENT + ErrorInfo.
    add_service(server, pb.DESCRIPTOR.services_by_name["RunnerService"], RunnerServicer(runner))
    port, health_servicer = await serve_with_health(
        server,
        SERVICE_NAME,
        listen,
        tls,
        sandbox_status=runner.engine.sandbox_status,
        listen_setting="MACHINA_RUNNER_LISTEN (--listen)",
    )
    return server, port, health_servicer

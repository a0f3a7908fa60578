"""gRPC face of the runner: machina.runner.v1.RunnerService (+ health and reflection)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine_service._errors import EngineError, ErrorKind
from engine_service._server import add_service, error_status
from machina.runner.v1 import runner_service_pb2 as pb
from machina.runner.v1 import runner_service_pb2_grpc as pb_grpc
from runner_service._runner import Rejected, Runner

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RunnerService"].full_name

_KIND_BY_HTTP: Mapping[int, ErrorKind] = {
    400: ErrorKind.INVALID_ARGUMENT,
    401: ErrorKind.UNAUTHENTICATED,
    404: ErrorKind.NOT_FOUND,
    409: ErrorKind.FAILED_PRECONDITION,
    503: ErrorKind.UNAVAILABLE,
}


class RunnerServicer(pb_grpc.RunnerServiceServicer):
    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    async def Continue(self, request: pb.ContinueRequest, context: Any) -> pb.ContinueResponse:
        try:
            metadata = dict(context.invocation_metadata() or ())
            self._runner.check_bearer(metadata.get("authorization"))
            await self._runner.accept(request.run_id, request.workspace_id)
        except Rejected as rejected:
            status = error_status(
                EngineError(rejected.code, rejected.message, kind=_KIND_BY_HTTP[rejected.status])
            )
            context.set_code(status.code)
            context.set_details(status.details)
            context.set_trailing_metadata(status.trailing_metadata)
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
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    if tls is not None:
        port = server.add_secure_port(listen, grpc.ssl_server_credentials([tls]))
    else:
        port = server.add_insecure_port(listen)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer

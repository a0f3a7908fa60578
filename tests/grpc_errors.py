"""Reading the ``google.rpc.ErrorInfo`` out of a gRPC error (AIP-193)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


def error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo in domain machina.dev in the status details, consistent with the status code."""
    trailers = dict(exc.trailing_metadata() or ())
    assert "grpc-status-details-bin" in trailers, f"{exc.code()} without ErrorInfo: {exc.details()}"
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == exc.code().value[0]
    assert len(status.details) == 1, status
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "machina.dev"
    return info

"""Engine errors on the wire: a gRPC status with one ErrorInfo, bounded so any client accepts it."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine_service.core._errors import EngineError

ERROR_DOMAIN = "machina.dev"

Context: TypeAlias = Any  # grpc.aio.ServicerContext (grpc ships no types)


# A default gRPC client refuses trailers past 8 KiB (grpc.max_metadata_size). The message travels
# twice: percent-encoded in grpc-message, and in grpc-status-details-bin (base64 on the wire) with
# the ErrorInfo. With these bounds an error's trailers stay under about 5 KiB, whatever it repeats.
_MAX_MESSAGE_BYTES = 1024  # as percent-encoded in grpc-message
_MAX_METADATA_ENTRIES = 10
_MAX_METADATA_KEY_BYTES = 64
_MAX_METADATA_VALUE_BYTES = 128


def _fit(text: str, max_bytes: int, *, percent_encoded: bool = False) -> str:
    """``text`` cut (at a character) so that its UTF-8, or its grpc-message percent-encoding, fits."""
    # Lone surrogates (Python strings may hold them, protobuf strings cannot) become U+FFFD.
    data = text.encode("utf-8", "replace")
    head = data[:max_bytes]  # every byte costs at least one
    # grpc-message keeps printable ASCII but '%' and encodes every other byte as %XX.
    cost = [1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in head] if percent_encoded else [1] * len(head)
    if len(data) <= max_bytes and sum(cost) <= max_bytes:
        return data.decode()
    suffix = f"…({len(text)} chars)"
    budget = max_bytes - 3 * len(suffix.encode())
    end = used = 0
    while end < len(head) and used + cost[end] <= budget:
        used += cost[end]
        end += 1
    return head[:end].decode("utf-8", "ignore") + suffix


def error_status(error: EngineError) -> grpc.Status:
    """A canonical status with exactly one google.rpc.ErrorInfo (AIP-193), small enough for any client.

    Errors should show request values through `_errors.shown`; this bounds whatever still gets here.
    """
    code = code_pb2.Code.Value(error.kind.name)  # each ErrorKind is named after its canonical code
    metadata = {
        _fit(key, _MAX_METADATA_KEY_BYTES): _fit(value, _MAX_METADATA_VALUE_BYTES)
        for key, value in list(error.metadata.items())[:_MAX_METADATA_ENTRIES]
    }
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    message = _fit(error.message, _MAX_MESSAGE_BYTES, percent_encoded=True)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


def set_error(context: Context, error: EngineError) -> None:
    """End the RPC with ``error`` (as `error_status`) once its handler returns."""
    # Setting the status (instead of abort_with_status) ends the RPC when the
    # handler returns, and works with grpcio-testing's in-memory contexts too.
    status = error_status(error)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)

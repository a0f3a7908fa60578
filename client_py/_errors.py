"""Typed exceptions for the engine's errors, decoded from the gRPC status.

The engine sends one ``google.rpc.ErrorInfo`` (domain ``machina.dev``) inside the
``grpc-status-details-bin`` trailer. The client must not depend on
googleapis-common-protos, so the two ``google.rpc`` messages are declared here in
a private descriptor pool: the real protobuf parser decodes them, and a process
that also imports ``google.rpc.status_pb2`` (the server does) sees no clash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message, message_factory

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "ConcurrentUpdateError",
    "DeadlineExceededError",
    "DestinationRefusedError",
    "FailedPreconditionError",
    "ForkPointError",
    "InternalError",
    "InterruptDecidedError",
    "InterruptNotFoundError",
    "InvalidArgumentError",
    "InvalidDecisionError",
    "InvalidEditsError",
    "InvalidIdError",
    "InvalidRequestError",
    "InvalidScriptError",
    "MachinaError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestTooLargeError",
    "ResourceExhaustedError",
    "RpcCancelledError",
    "RunActiveError",
    "RunExistsError",
    "RunNotFoundError",
    "RunNotPausedError",
    "RunReferencedError",
    "RunTerminalError",
    "ShuttingDownError",
    "StorageUnavailableError",
    "ThreadBusyError",
    "ThreadExistsError",
    "ThreadNotFoundError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownToolError",
    "error_from_rpc",
]

DOMAIN = "machina.dev"
_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "google.rpc.ErrorInfo"


class MachinaError(Exception):
    """An error returned by the engine (or by the transport on its way).

    Attributes:
        reason: the stable reason (the ErrorInfo's ``reason``), e.g. ``"ERR_RUN_NOT_FOUND"``.
            When the server sent no ErrorInfo (a proxy, or a server that is down) it is the
            gRPC status name instead, e.g. ``"UNAVAILABLE"``.
        code: deprecated, read-only: the same as ``reason`` (its former name), kept so
            existing code keeps working. Use ``reason``.
        message: a human-readable message.
        metadata: the dynamic values the message mentions.
        status: the ``grpc.StatusCode`` of the call.
    """

    default_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        status: grpc.StatusCode | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status: grpc.StatusCode = self.default_status if status is None else status
        self.metadata: dict[str, str] = dict(metadata or {})

    @property
    def code(self) -> str:
        """Deprecated: the former name of ``reason`` (read-only). Use ``reason``."""
        return self.reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.reason!r}, message={self.message!r}, "
            f"status={self.status.name}, metadata={self.metadata!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only constructor defeats Exception's default pickling, which
        # matters when errors cross process boundaries (multiprocessing, Dask…).
        return (_rebuild, (type(self), self.reason, self.message, self.status.name, self.metadata))


def _rebuild(
    cls: type[MachinaError], reason: str, message: str, status: str, metadata: dict[str, str]
) -> MachinaError:
    return cls(reason, message, status=grpc.StatusCode[status], metadata=metadata)


# Status-level classes: what a caller can catch without knowing every reason, and
# what an error maps to when its reason is unknown to this client version.


class InvalidArgumentError(MachinaError, ValueError):
    default_status = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(MachinaError):
    default_status = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(MachinaError):
    default_status = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(MachinaError):
    default_status = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(MachinaError):
    default_status = grpc.StatusCode.ABORTED


class UnauthenticatedError(MachinaError):
    default_status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(MachinaError):
    default_status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(MachinaError):
    default_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnimplementedError(MachinaError):
    default_status = grpc.StatusCode.UNIMPLEMENTED


class UnavailableError(MachinaError):
    """The server could not be reached or is restarting; safe calls were already retried."""

    default_status = grpc.StatusCode.UNAVAILABLE


class InternalError(MachinaError):
    default_status = grpc.StatusCode.INTERNAL


class DeadlineExceededError(MachinaError):
    default_status = grpc.StatusCode.DEADLINE_EXCEEDED


class RpcCancelledError(MachinaError):
    """The call was cancelled (named so it does not shadow ``asyncio.CancelledError``)."""

    default_status = grpc.StatusCode.CANCELLED


# Reason-level classes, one per stable reason the engine sends (docs/errors.toml).


class InvalidIdError(InvalidArgumentError):
    pass


class InvalidRequestError(InvalidArgumentError):
    pass


class InvalidScriptError(InvalidArgumentError):
    pass


class InvalidEditsError(InvalidArgumentError):
    pass


class InvalidDecisionError(InvalidArgumentError):
    pass


class UnknownToolError(InvalidArgumentError):
    pass


class DestinationRefusedError(InvalidArgumentError):
    """A webhook URL or per-run service base_url names an address the engine's egress policy refuses."""


class RunNotFoundError(NotFoundError):
    pass


class InterruptNotFoundError(NotFoundError):
    pass


class ResultNotFoundError(NotFoundError):
    pass


class RunExistsError(AlreadyExistsError):
    pass


class RunNotPausedError(FailedPreconditionError):
    pass


class RunTerminalError(FailedPreconditionError):
    pass


class InterruptDecidedError(FailedPreconditionError):
    pass


class ThreadNotFoundError(NotFoundError):
    """No such thread in the caller's workspace."""


class ThreadExistsError(AlreadyExistsError):
    """A fork names a thread id that is taken."""


class ThreadBusyError(FailedPreconditionError):
    """The thread's latest run is not ended (one active run per thread): wait or cancel it."""


class ForkPointError(FailedPreconditionError):
    """The fork point is a turn the run has not completed, or a seq outside its completed turns."""


class RunActiveError(FailedPreconditionError):
    """The run is queued, running or paused: cancel it before deleting it."""


class RunReferencedError(FailedPreconditionError):
    """A later run of its thread or a fork shares the run's history (``metadata['referenced_by']``)."""


class ConcurrentUpdateError(AbortedError):
    pass


class RequestTooLargeError(ResourceExhaustedError):
    """Kept so code that catches it keeps working; the engine sends no reason for it (a request
    over the message limit is refused by gRPC itself and decodes to ``ResourceExhaustedError``)."""


class ShuttingDownError(UnavailableError):
    pass


class StorageUnavailableError(UnavailableError):
    """The engine's storage is read-only, full or unreachable; retry later (same request_id)."""


_BY_REASON: dict[str, type[MachinaError]] = {
    "ERR_INVALID_ID": InvalidIdError,
    "ERR_INVALID_REQUEST": InvalidRequestError,
    "ERR_VALUE_TOO_DEEP": InvalidRequestError,
    "ERR_VALUE_TOO_LARGE": InvalidRequestError,
    "ERR_INVALID_SCRIPT": InvalidScriptError,
    "ERR_INVALID_EDITS": InvalidEditsError,
    "ERR_INVALID_DECISION": InvalidDecisionError,
    "ERR_UNKNOWN_TOOL": UnknownToolError,
    "ERR_DESTINATION_REFUSED": DestinationRefusedError,
    "ERR_RUN_NOT_FOUND": RunNotFoundError,
    "ERR_INTERRUPT_NOT_FOUND": InterruptNotFoundError,
    "ERR_RESULT_NOT_FOUND": ResultNotFoundError,
    "ERR_RUN_EXISTS": RunExistsError,
    "ERR_REQUEST_ID_REUSED": FailedPreconditionError,
    "ERR_RUN_NOT_PAUSED": RunNotPausedError,
    "ERR_RUN_TERMINAL": RunTerminalError,
    "ERR_THREAD_NOT_FOUND": ThreadNotFoundError,
    "ERR_THREAD_EXISTS": ThreadExistsError,
    "ERR_THREAD_BUSY": ThreadBusyError,
    "ERR_FORK_POINT": ForkPointError,
    "ERR_RUN_ACTIVE": RunActiveError,
    "ERR_RUN_REFERENCED": RunReferencedError,
    "ERR_INTERRUPT_DECIDED": InterruptDecidedError,
    "ERR_CONCURRENT_UPDATE": ConcurrentUpdateError,
    "ERR_UNAUTHENTICATED": UnauthenticatedError,
    "ERR_PERMISSION_DENIED": PermissionDeniedError,
    "ERR_SHUTTING_DOWN": ShuttingDownError,
    "ERR_STORAGE_UNAVAILABLE": StorageUnavailableError,
    "ERR_INTERNAL": InternalError,
}

# Used when the reason is missing or unknown to this client version.
_BY_STATUS: dict[grpc.StatusCode, type[MachinaError]] = {
    cls.default_status: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        AbortedError,
        UnauthenticatedError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnimplementedError,
        UnavailableError,
        InternalError,
        DeadlineExceededError,
        RpcCancelledError,
    )
}


def _build_rpc_messages() -> tuple[type[message.Message], type[message.Message]]:
    pool = descriptor_pool.DescriptorPool()
    any_file = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_file)
    pool.Add(any_file)

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    rpc_file = descriptor_pb2.FileDescriptorProto(
        # A name of our own: only the package and message names must match the wire.
        name="client_py/google_rpc_subset.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    status = rpc_file.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=field.TYPE_INT32, label=optional)
    status.field.add(name="message", number=2, type=field.TYPE_STRING, label=optional)
    status.field.add(
        name="details", number=3, type=field.TYPE_MESSAGE, label=repeated, type_name=".google.protobuf.Any"
    )
    info = rpc_file.message_type.add(name="ErrorInfo")
    info.field.add(name="reason", number=1, type=field.TYPE_STRING, label=optional)
    info.field.add(name="domain", number=2, type=field.TYPE_STRING, label=optional)
    info.field.add(
        name="metadata",
        number=3,
        type=field.TYPE_MESSAGE,
        label=repeated,
        type_name=".google.rpc.ErrorInfo.MetadataEntry",
    )
    entry = info.nested_type.add(name="MetadataEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=field.TYPE_STRING, label=optional)
    pool.Add(rpc_file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.ErrorInfo")),
    )


_Status, _ErrorInfo = _build_rpc_messages()


class _Details:
    """What the status trailer says; empty when there was none or it was unreadable."""

    __slots__ = ("domain", "message", "metadata", "reason")

    def __init__(self) -> None:
        self.message = ""
        self.reason = ""
        self.domain = ""
        self.metadata: dict[str, str] = {}


def decode_status_details(raw: bytes) -> _Details:
    """Decodes a serialized ``google.rpc.Status`` and its first ErrorInfo.

    A malformed trailer must never hide the original error, so decoding
    problems leave the fields empty instead of raising.
    """
    details = _Details()
    try:
        status: Any = _Status.FromString(raw)
    except message.DecodeError:
        return details
    details.message = status.message
    for detail in status.details:
        if detail.type_url.rpartition("/")[2] != _ERROR_INFO_TYPE:
            continue
        try:
            info: Any = _ErrorInfo.FromString(detail.value)
        except message.DecodeError:
            continue
        details.reason = info.reason
        details.domain = info.domain
        details.metadata = dict(info.metadata)
        break
    return details


def _trailer(metadata: Iterable[Any] | None) -> bytes | None:
    for item in metadata or ():
        key, value = item
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return value
    return None


def refused(reason: str, message: str, **metadata: object) -> InvalidArgumentError:
    """A request the client refuses before sending it, as the class the engine's refusal decodes to.

    So a caller catches one class per condition, whoever noticed the mistake; the classes are
    also ``ValueError`` subclasses.
    """
    cls = _BY_REASON.get(reason, InvalidArgumentError)
    assert issubclass(cls, InvalidArgumentError), reason
    return cls(
        reason,
        message,
        status=grpc.StatusCode.INVALID_ARGUMENT,
        metadata={k: str(v) for k, v in metadata.items()},
    )


def error_from_rpc(exc: grpc.RpcError) -> MachinaError:
    """Converts a failed gRPC call (sync or ``grpc.aio``) into a typed ``MachinaError``.

    The class is chosen by the ErrorInfo reason when it is ours and known, else by
    the status code (e.g. ``UnavailableError`` for a server that is down).
    """
    code_fn = getattr(exc, "code", None)
    status = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(exc, "details", None)
    text = (details_fn() if callable(details_fn) else None) or ""
    trailing_fn = getattr(exc, "trailing_metadata", None)
    raw = _trailer(trailing_fn() if callable(trailing_fn) else None)
    details = decode_status_details(raw) if raw is not None else _Details()

    ours = bool(details.reason) and details.domain in (DOMAIN, "")
    cls = (_BY_REASON.get(details.reason) if ours else None) or _BY_STATUS.get(status, MachinaError)
    reason = details.reason if ours else status.name
    return cls(reason, details.message or text, status=status, metadata=details.metadata)

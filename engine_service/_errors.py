"""Domain errors: a stable code, a clear message and the values it mentions.

The servicer maps `ErrorKind` to a gRPC status code; clients branch on `code`.
Messages never contain secrets: only values the caller already supplied or ids.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorKind(enum.Enum):
    """The category of an error; decides the gRPC status code."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
    UNIMPLEMENTED = "unimplemented"


class EngineError(Exception):
    """An error with a stable code (e.g. ``ERR_RUN_NOT_FOUND``) and metadata."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        kind: ErrorKind = ErrorKind.INVALID_ARGUMENT,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    def __repr__(self) -> str:
        return f"EngineError({self.code!r}, {self.message!r})"


def invalid(code: str, message: str, **metadata: object) -> EngineError:
    return EngineError(code, message, kind=ErrorKind.INVALID_ARGUMENT, metadata=metadata)


def not_found(code: str, message: str, **metadata: object) -> EngineError:
    return EngineError(code, message, kind=ErrorKind.NOT_FOUND, metadata=metadata)


def precondition(code: str, message: str, **metadata: object) -> EngineError:
    return EngineError(code, message, kind=ErrorKind.FAILED_PRECONDITION, metadata=metadata)


def aborted(code: str, message: str, **metadata: object) -> EngineError:
    return EngineError(code, message, kind=ErrorKind.ABORTED, metadata=metadata)


class RunFailure(Exception):
    """Ends a run as FAILED with ``code``; raised inside the agent loop."""

    def __init__(self, code: str, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}

"""Domain errors: a stable reason, a clear message and the values it mentions.

The servicer maps `ErrorKind` to a gRPC status code and sends the reason as the
ErrorInfo's ``reason``; clients branch on it.
Messages never contain secrets: only values the caller already supplied or ids.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence


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
    """An error with a stable reason (e.g. ``ERR_RUN_NOT_FOUND``) and metadata."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        kind: ErrorKind = ErrorKind.INVALID_ARGUMENT,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.kind = kind
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    @property
    def code(self) -> str:
        """Deprecated: the former name of ``reason`` (read-only)."""
        return self.reason

    def __repr__(self) -> str:
        return f"EngineError({self.reason!r}, {self.message!r})"


SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as an error may repeat it: whole when short, else its start and its length.

    Errors reach callers in gRPC trailers, which a default client refuses past 8 KiB: a value
    from a request is never repeated whole (``api/_errors.error_status`` bounds the rest).
    """
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} chars)"


def shown_list(values: Sequence[object], most: int = 5) -> str:
    """``values`` joined with commas as `shown` bounds each, at most ``most`` of them."""
    listed = ", ".join(shown(v) for v in values[:most])
    return listed if len(values) <= most else f"{listed} and {len(values) - most} more"


def invalid(reason: str, message: str, **metadata: object) -> EngineError:
    return EngineError(reason, message, kind=ErrorKind.INVALID_ARGUMENT, metadata=metadata)


def not_found(reason: str, message: str, **metadata: object) -> EngineError:
    return EngineError(reason, message, kind=ErrorKind.NOT_FOUND, metadata=metadata)


def precondition(reason: str, message: str, **metadata: object) -> EngineError:
    return EngineError(reason, message, kind=ErrorKind.FAILED_PRECONDITION, metadata=metadata)


def aborted(reason: str, message: str, **metadata: object) -> EngineError:
    return EngineError(reason, message, kind=ErrorKind.ABORTED, metadata=metadata)


class RunFailure(Exception):
    """Ends a run as FAILED with ``code``; raised inside the agent loop."""

    def __init__(self, code: str, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}


def missing_extra(
    package: str, extra: str, feature: str, exc: ModuleNotFoundError | None = None
) -> EngineError:
    """The error for ``feature`` needing the optional ``package`` (the ``extra``), not installed.

    Given the ``exc`` an import raised, re-raises it unchanged when the missing module is not
    ``package`` itself: a broken install of something else is not a missing extra.
    """
    if exc is not None and (exc.name is None or exc.name.split(".")[0] != package):
        raise exc
    return EngineError(
        "ERR_CONFIG",
        f"{feature} needs the optional '{extra}' dependencies, which are not installed: "
        f"pip install 'machina-engine[{extra}]'",
        kind=ErrorKind.FAILED_PRECONDITION,
        metadata={"extra": extra},
    )

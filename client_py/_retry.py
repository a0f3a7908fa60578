"""How the client retries a unary call that cannot do anything twice."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent unary calls (GetRun, ListRuns, WaitRun, GetToolResult, ResumeRun,
    CreateRun with a request_id); other calls are never retried.

    Attempt ``n`` (0-based) that fails with one of ``retryable`` waits
    ``min(max_backoff, initial_backoff * multiplier**n)``, scaled by a random factor in
    ``[1 - jitter, 1]``, then tries again, up to ``max_attempts`` attempts in all.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retryable: Sequence[grpc.StatusCode] = (grpc.StatusCode.UNAVAILABLE,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not (self.initial_backoff >= 0 and self.max_backoff >= 0 and self.multiplier >= 1):
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")
        object.__setattr__(self, "retryable", tuple(self.retryable))

    @classmethod
    def retries(cls, max_retries: int) -> RetryPolicy:
        """The default policy with ``max_retries`` retries (``max_retries + 1`` attempts)."""
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        return cls(max_attempts=max_retries + 1)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        # Jitter spreads out clients that all lost the same server at once.
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return delay * random.uniform(1.0 - self.jitter, 1.0)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether failed attempt ``attempt`` (0-based) with ``code`` is tried again."""
        return code in self.retryable and attempt + 1 < self.max_attempts

"""Custom tools the tests register (by object, and by import path in config tests)."""

from __future__ import annotations

from engine_service.testing import (
    SAMPLE_TOOLS,
    DoubleArgs,
    EchoArgs,
    RemoveArgs,
    SleepArgs,
    double,
    echo,
    explode,
    noop,
    remove,
    sleep,
    ticket,
)

ALL = SAMPLE_TOOLS

__all__ = [
    "ALL",
    "DoubleArgs",
    "EchoArgs",
    "RemoveArgs",
    "SleepArgs",
    "double",
    "echo",
    "explode",
    "noop",
    "remove",
    "sleep",
    "ticket",
]

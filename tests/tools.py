"""Custom tools the tests register (by object, and by import path in config tests)."""

from __future__ import annotations

import asyncio

from engine_service import ToolContext, tool
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


@tool
async def sleep_and_write(args: SleepArgs, ctx: ToolContext) -> str:
    """Sleep, then write a file into the run's directory, too large to travel inside the
    checkpoint: its next checkpoint stores a new file (a blob) in storage."""
    await asyncio.sleep(args.seconds)
    if ctx.workdir is not None:
        (ctx.workdir / f"{ctx.call_id}.txt").write_text("written by the call\n" * 4096)
    return f"slept {args.seconds}s and wrote a file"


@tool(idempotent=True)
async def linger(args: SleepArgs, ctx: ToolContext) -> str:
    """Sleep; idempotent, so no checkpoint comes before it (it runs again after a crash)."""
    await asyncio.sleep(args.seconds)
    return f"lingered {args.seconds}s"


__all__ = [
    "ALL",
    "DoubleArgs",
    "EchoArgs",
    "RemoveArgs",
    "SleepArgs",
    "double",
    "echo",
    "explode",
    "linger",
    "noop",
    "remove",
    "sleep",
    "sleep_and_write",
    "ticket",
]

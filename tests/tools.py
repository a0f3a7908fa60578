"""Custom tools the tests register (by object, and by import path in config tests)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from engine_service import ToolContext, tool


class DoubleArgs(BaseModel):
    x: int = Field(description="The number to double.")


@tool
async def double(args: DoubleArgs, ctx: ToolContext) -> int:
    """Double a number."""
    return args.x * 2


class EchoArgs(BaseModel):
    text: str


@tool(description="Echo the text back.")
def echo(args: EchoArgs, ctx: ToolContext) -> str:
    return args.text


@tool(input_schema={"type": "object", "properties": {}, "additionalProperties": True}, idempotent=True)
async def noop(args: dict[str, object], ctx: ToolContext) -> str:
    """Do nothing (benchmarks and loops)."""
    return "ok"


class SleepArgs(BaseModel):
    seconds: float = Field(ge=0, le=30)


@tool
async def sleep(args: SleepArgs, ctx: ToolContext) -> str:
    """Sleep for a while (cancellation tests)."""
    await asyncio.sleep(args.seconds)
    return f"slept {args.seconds}s"


@tool(input_schema={"type": "object"})
async def explode(args: dict[str, object], ctx: ToolContext) -> str:
    """Always fails."""
    raise RuntimeError("boom")


class RemoveArgs(BaseModel):
    path: str


@tool
async def remove(args: RemoveArgs, ctx: ToolContext) -> str:
    """Delete a file of the run's directory (the built-in file tools cannot)."""
    from engine_service.tools._files import resolve_in_workdir

    assert ctx.workdir is not None
    resolve_in_workdir(ctx.workdir, args.path).unlink()
    return f"removed {args.path}"


@tool(
    input_schema={
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"}},
        "required": ["code"],
    }
)
async def ticket(args: dict[str, object], ctx: ToolContext) -> str:
    """Open a ticket (its code is checked by a pattern)."""
    return f"opened {args['code']}"


ALL = [double, echo, noop, sleep, explode, ticket]

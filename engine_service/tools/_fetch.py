"""FetchData: read the full text of a tool result the model only saw truncated."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, Field

from engine_service.tools._registry import ToolContext, ToolError, tool_from_callable


def result_blob_name(call_id: str) -> str:
    """Storage name of a call's full result (hashed: provider call ids are not our id alphabet)."""
    return "result-" + hashlib.sha256(call_id.encode()).hexdigest()[:40]


def truncation_note(call_id: str, shown: int, total: int) -> str:
    return (
        f"\n[truncated: showing {shown} of {total} characters. The full result is stored; "
        f"call FetchData with ref {call_id!r} and offset {shown} to read on]"
    )


class FetchDataArgs(BaseModel):
    ref: str = Field(min_length=1, max_length=256, description="The ref named in a truncated tool result.")
    offset: int = Field(0, ge=0, description="Character offset to start reading at.")
    length: int = Field(20_000, ge=1, le=200_000, description="How many characters to return.")


async def fetch_data(args: FetchDataArgs, ctx: ToolContext) -> str:
    """Read more of a tool result that was too large to show in full."""
    full = await ctx.fetch_result(args.ref) if ctx.fetch_result is not None else None
    if full is None:
        raise ToolError(f"no stored result has ref {args.ref!r}")
    chunk = full[args.offset : args.offset + args.length]
    end = args.offset + len(chunk)
    if end < len(full):
        return chunk + f"\n[{len(full) - end} more characters; call FetchData with offset {end}]"
    return chunk + "\n[end of result]"


FETCH_DATA = tool_from_callable(fetch_data, name="FetchData", idempotent=True)

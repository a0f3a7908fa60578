"""Two small custom tools the demo engine registers by import path (see engine.toml)."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, Field

from engine_service import ToolContext, tool


class WeatherArgs(BaseModel):
    city: str = Field(description="City name, e.g. 'Paris'.")


@tool
async def get_weather(args: WeatherArgs, ctx: ToolContext) -> dict[str, object]:
    """Get today's weather for a city (offline demo data, deterministic per city)."""
    seed = int(hashlib.sha256(args.city.lower().encode()).hexdigest(), 16)
    return {"city": args.city, "temp_c": 12 + seed % 15, "sky": ["sunny", "cloudy", "rainy"][seed % 3]}


class EmailArgs(BaseModel):
    to: str = Field(description="Recipient address.")
    subject: str
    body: str


@tool
async def send_email(args: EmailArgs, ctx: ToolContext) -> str:
    """Send an email (the demo only pretends). Needs a human's approval."""
    digest = hashlib.sha256(f"{ctx.run_id}{args.to}{args.subject}".encode()).hexdigest()[:10]
    return f"queued message {digest} to {args.to}"

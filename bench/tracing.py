"""``python -m bench.tracing``: what tracing costs per turn, beside tracing off, in one run.

The same scripted run (a no-op tool call per turn, a checkpoint per turn) in process, alternately
with tracing off (the default) and on, recording every span (``invoke_agent``, ``chat``,
``execute_tool``) through a batch processor into an in-memory exporter: no console, no network,
so the figure is the engine's own cost of making spans. Prints the rows; ``rows`` is the bench
group.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench._common import per_turn_ms
from bench._rows import summarize
from engine_service.api.serving import telemetry


async def measure(turns: int, rounds: int) -> dict[str, Any]:
    """Per-turn milliseconds with tracing off and on, alternating rounds so drift hits both."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 16))
    off: list[float] = []
    on: list[float] = []
    await per_turn_ms(turns, 1)  # warm up imports and caches outside the measurement
    try:
        for _ in range(rounds):
            telemetry.uninstall()
            off += await per_turn_ms(turns, 1)
            telemetry.install_tracer_provider(provider)
            on += await per_turn_ms(turns, 1)
    finally:
        telemetry.uninstall()
        provider.force_flush()
        provider.shutdown()
    spans = len(exporter.get_finished_spans())
    return {"turns": turns, "rounds": rounds, "off_ms": off, "on_ms": on, "spans": spans}


async def rows(quick: bool) -> list[dict[str, Any]]:
    data = await measure(turns=20 if quick else 200, rounds=2 if quick else 6)
    off, on = statistics.median(data["off_ms"]), statistics.median(data["on_ms"])
    overhead = (on - off) / off * 100 if off else 0.0
    runs = f"median of {data['rounds']} runs of {data['turns']} turns"
    return [
        {
            "name": "per-turn time, tracing off (default)",
            "value": f"{off:.3f} ms/turn ({runs})",
            "target": "",
            "verdict": "REPORT",
            "data": {"ms_per_turn": off, "samples": summarize(data["off_ms"])},
        },
        {
            "name": "per-turn time, tracing on (in-memory exporter)",
            "value": f"{on:.3f} ms/turn, {overhead:+.0f}% beside off ({data['spans']} spans)",
            "target": "",
            "verdict": "REPORT",
            "data": {
                "ms_per_turn": on,
                "overhead_pct": round(overhead, 1),
                "spans": data["spans"],
                "samples": summarize(data["on_ms"]),
            },
        },
    ]


def main() -> None:
    for row in asyncio.run(rows(quick=False)):
        print(f"{row['name']}: {row['value']}")


if __name__ == "__main__":
    main()

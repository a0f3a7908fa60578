"""Context compaction: the model's input tokens per turn of a long run, with and without it.

One scripted run of ``TURNS`` turns, each calling ``echo`` with a ~600-character text (so each
turn adds ~300 tokens of history), in process. The scripted model reports the input tokens of
each request it gets (about four characters a token), so the ``usage`` events show what the
model is sent turn by turn. Side by side: the same script under a ``WINDOW``-token context
window (compaction) and with none (the whole history every turn, the baseline).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench._common import PRINCIPAL, bench_engine
from engine_service import LocalStorage, RunSpec, RunState, ScriptedTurn

TURNS = 200
WINDOW = 8_000
_TEXT = "lorem ipsum dolor sit amet " * 22


def script(turns: int) -> list[ScriptedTurn]:
    steps = [ScriptedTurn(f"step {i}", [("echo", {"text": f"{i}: {_TEXT}"})]) for i in range(turns)]
    return [*steps, ScriptedTurn("done")]


async def input_tokens_per_turn(turns: int, window: int) -> tuple[list[int], int]:
    """(input tokens of each turn's request, compactions) of one run; ``window`` 0 = no compaction."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = LocalStorage(tmp)
        engine = bench_engine(storage, str(Path(tmp) / "work"))
        try:
            spec = RunSpec(
                task="bench",
                model_provider="scripted",
                script=script(turns),
                max_turns=turns + 2,
                context_window_tokens=window,
            )
            record, _ = await engine.create_run(PRINCIPAL, spec)
            record, _ = await engine.wait_run(PRINCIPAL, record.run_id, timeout=600)
            assert record.state is RunState.DONE, record.error
            events = await storage.read_segments("default", record.run_id, "events", 0, 1_000_000)
        finally:
            await engine.close()
    inputs = [e["d"]["usage"]["input_tokens"] for e in events if e["k"] == "usage"]
    return inputs, sum(1 for e in events if e["k"] == "context_compacted")


async def rows(quick: bool) -> list[dict[str, Any]]:
    turns = TURNS
    compacted, compactions = await input_tokens_per_turn(turns, WINDOW)
    growing, _ = await input_tokens_per_turn(turns, 0)
    at, half = compacted[turns - 1], compacted[turns // 2 - 1]
    base_at, base_half = growing[turns - 1], growing[turns // 2 - 1]
    # Bounded: from turn 20 on, no request is larger than the window.
    late_max = max(compacted[19:])
    bounded = late_max <= WINDOW
    compacted_figures = {
        "turns": turns,
        "window_tokens": WINDOW,
        "compactions": compactions,
        "input_tokens_turn_100": half,
        "input_tokens_turn_200": at,
        "max_input_tokens_after_turn_20": late_max,
    }
    baseline_figures = {"input_tokens_turn_100": base_half, "input_tokens_turn_200": base_at}
    return [
        {
            "name": f"model input tokens at turn {turns}, compaction (window {WINDOW:,})",
            "value": (
                f"{at:,} (turn {turns // 2}: {half:,}; max from turn 20: {late_max:,}; "
                f"{compactions} compactions)"
            ),
            "target": "bounded by the window, not growing",
            "verdict": "MET" if bounded else "MISSED",
            "data": compacted_figures,
        },
        {
            "name": f"model input tokens at turn {turns}, no compaction (baseline)",
            "value": f"{base_at:,} (turn {turns // 2}: {base_half:,})",
            "target": "",
            "verdict": "REPORT",
            "data": baseline_figures,
        },
        {
            "name": f"input tokens at turn {turns}: compaction / baseline",
            "value": f"{at / base_at:.3f}",
            "target": "",
            "verdict": "REPORT",
            "data": {"ratio": at / base_at},
        },
    ]

"""The fast-path bench group runs end to end with tiny sizes (real engine processes, gRPC), and its
rows carry verdicts computed from the numbers and flat figures for ``--compare``."""

from __future__ import annotations

import pytest

from bench import fastpath
from bench._rows import VERDICTS, from_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def test_each_measurement_runs_with_tiny_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_BASELINE_ROOT", raising=False)
    turns = await fastpath.per_turn_ms((3,), 1)
    assert set(turns["now"]) == {"off", "on"}
    assert all(len(turns["now"][s][3]) == 1 for s in ("off", "on"))
    approvals = await fastpath.approval_ms(1)
    assert len(approvals["now"]["off"]["resume"]) == 1
    together = await fastpath.concurrent_turns_per_s(2, 3, 1)
    assert together["together"][0] > 0
    monkeypatch.setattr(fastpath, "STREAMS", 3)
    streams = await fastpath.streams(20, 1)
    assert streams["now"][0] > 0
    assert streams["two"][0] > 0


def test_rows_have_computed_verdicts_and_flat_figures() -> None:
    s = fastpath._stats([0.8, 1.2, 0.9])
    row = fastpath._row("x", fastpath._ms(s), "≤ 1 ms", s["median"] <= 1.0, fastpath._figures("ms", s, [2.0]))
    assert row["verdict"] == "MET"
    parsed = from_dict(row, "fastpath")
    assert parsed.verdict in VERDICTS
    assert parsed.figures["ratio_to_baseline"] == pytest.approx(0.45)
    assert fastpath._row("y", "", "", None, {})["verdict"] == "REPORT"
    assert fastpath._stats([])["n"] == 0


def test_resume_costs_count_a_resume_from_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_BASELINE_ROOT", raising=False)
    costs = fastpath.resume_costs(2)["now"]
    # A run the engine paused itself: its spec and transcript are not read back.
    assert "read_spec" not in costs["storage_ops"]
    assert "read_segments" not in costs["storage_ops"]
    assert costs["storage_ops"]["acquire_lease"] == 1
    assert costs["python_calls"] > 0

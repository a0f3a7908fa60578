"""The control-plane bench runs end to end (tiny sizes; the figures are `just bench`'s)."""

from __future__ import annotations

import pytest

from bench.control import measure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_the_control_bench_measures_every_row() -> None:
    rows = await measure(indexed=500, embedded_runs=50, idle_s=1.0, events=12)
    assert [r["verdict"] in ("MET", "MISSED") for r in rows] == [True] * 4
    assert rows[2]["data"]["control"] == 0  # an idle watcher reads nothing

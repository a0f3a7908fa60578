"""The bench harness: verdicts come from the numbers, a broken group is an ERROR row, groups can be
chosen, results compare; one short real run of ``python -m bench --quick --only``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as bench_main
from bench import turns
from bench._rows import Check, Row, Target, at_least, at_most, from_dict, row, summarize
from bench._script import edit_script
from tests.conftest import ROOT


def test_a_verdict_is_met_or_missed_by_the_figures() -> None:
    target = at_most("p50_ms", 1.0, "p50 ≤ 1 ms")
    assert row("x", "0.9 ms", {"p50_ms": 0.9}, target).verdict == "MET"
    assert row("x", "1.1 ms", {"p50_ms": 1.1}, target).verdict == "MISSED"
    assert row("x", "1.1 ms", {"p50_ms": 1.1}).verdict == "REPORT"


@pytest.mark.parametrize("figures", [{}, {"p50_ms": float("nan")}, {"other": 0.1}])
def test_a_figure_that_could_not_be_measured_misses_its_target(figures: dict[str, float]) -> None:
    assert row("x", "?", figures, at_most("p50_ms", 1.0, "p50 ≤ 1 ms")).verdict == "MISSED"


def test_every_check_of_a_target_must_hold() -> None:
    target = Target("p50 ≤ 1, p99 ≤ 5", (Check("p50", "<=", 1), Check("p99", "<=", 5)))
    assert row("t", "", {"p50": 0.5, "p99": 4.0}, target).verdict == "MET"
    assert row("t", "", {"p50": 0.5, "p99": 6.0}, target).verdict == "MISSED"


def test_runs_that_did_not_all_finish_miss_all_done() -> None:
    target = at_least("done", 100, "all 100 DONE")
    assert row("runs", "", {"done": 100.0}, target).verdict == "MET"
    assert row("runs", "", {"done": 99.0}, target).verdict == "MISSED"


def test_a_feature_group_row_keeps_its_verdict_and_numbers() -> None:
    doc = {
        "name": "n",
        "value": "1",
        "target": "≤ 2",
        "verdict": "MET",
        "data": {"a": 1, "b": "x", "c": True},
    }
    r = from_dict(doc, "feature")
    assert (r.verdict, r.group, r.figures) == ("MET", "feature", {"a": 1.0})
    assert from_dict({**doc, "verdict": "met"}, "feature").verdict == "ERROR"


def test_a_failing_group_becomes_an_error_row_and_the_others_run() -> None:
    async def broken(ctx: Any) -> list[Row]:
        raise RuntimeError("boom")

    async def fine(ctx: Any) -> list[Row]:
        return [row("ok", "1", {"v": 1.0})]

    groups: list[tuple[str, str, bench_main.GroupFn]] = [("broken", "Broken", broken), ("fine", "Fine", fine)]
    result = asyncio.run(bench_main.measure_all(groups, quick=True))
    verdicts = {g["name"]: [r["verdict"] for r in g["rows"]] for g in result["groups"]}
    assert verdicts == {"broken": ["ERROR"], "fine": ["REPORT"]}
    assert "boom" in result["groups"][0]["rows"][0]["value"]
    assert result["schema"] == "machina-bench/2"
    assert "MISSED" not in bench_main.markdown(result)
    assert "| ok | 1 | — | REPORT |" in bench_main.markdown(result)


def test_the_registry_has_the_core_and_the_feature_groups() -> None:
    from bench.groups import GROUPS

    names = [name for name, _, _ in bench_main.registry()]
    assert len(names) == len(set(names))
    assert {"turns", "streams", "runs", "s3"} <= set(names)
    assert [module for module, _ in GROUPS] == names[len(bench_main.core_groups()) :]
    assert [g[0] for g in bench_main.select(bench_main.registry(), "s3,turns")] == ["turns", "s3"]
    with pytest.raises(SystemExit, match="unknown group"):
        bench_main.select(bench_main.registry(), "nope")


def _result(figures: dict[str, float]) -> dict[str, Any]:
    rows = [{"name": "per turn", "figures": figures, "value": "", "target": "", "verdict": "REPORT"}]
    return {"schema": "machina-bench/2", "groups": [{"name": "turns", "rows": rows}]}


def test_compare_gives_each_figure_new_over_old(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _result({"p50_ms": 2.0, "gone": 1.0}), _result({"p50_ms": 1.0, "new": 3.0})
    assert bench_main.compare(new, old) == [("per turn", "p50_ms", 2.0, 1.0, 0.5)]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    args = ["--results", str(tmp_path / "new.json"), "--compare", str(tmp_path / "old.json")]
    assert bench_main.main(args) == 0
    assert "0.500×  per turn [p50_ms]: 2 → 1" in capsys.readouterr().out


def test_compare_refuses_a_result_of_another_schema(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(SystemExit, match="machina-bench/2"):
        bench_main.main(["--results", str(tmp_path / "old.json"), "--compare", str(tmp_path / "old.json")])


def test_the_script_edits_a_file_every_turn_but_the_first_and_the_last() -> None:
    script = edit_script(4)
    assert [calls[0][0] if calls else None for _, calls in script] == ["Write", "Edit", "Edit", None]
    assert script[2][1][0][1] == {"path": "notes.txt", "old_string": "v1", "new_string": "v2"}
    assert edit_script(1) == [("done", [])]


PER_TURN = "Machina per turn through gRPC, Edit tool, creating the run left out, {} turns, {}"
RATIO = "Machina ÷ LangGraph create_agent per turn, creating the run left out, {} turns, {}"


def test_per_turn_growth_leaves_out_creating_the_run() -> None:
    side = turns.Side(runs={10: [19.0, 19.0], 100: [109.0]}, one_turn=[10.0, 10.0])
    assert side.per_turn(10)["median"] == pytest.approx(1.9)
    assert side.growth_per_turn(10)["median"] == pytest.approx(1.0)
    assert side.growth_per_turn(100)["median"] == pytest.approx(1.0)


def test_the_per_turn_table_computes_every_verdict() -> None:
    sizes = {10: 2, 100: 1}

    def side(scale: float) -> turns.Side:
        return turns.Side(
            runs={10: [10 * scale, 10 * scale], 100: [100 * scale]},
            one_turn=[scale],
            rss={100: {"rss_mb": 50 * scale, "peak_rss_mb": 60 * scale}},
            storage_bytes={100: 1000},
        )

    sides = {"fsync off": side(0.5), "fsync on": side(1.5)}
    sides.update({f"{a} {s}": side(10.0) for a, s in turns.LANGGRAPH})
    table = turns.table(sides, sizes, {10: summarize([0.3]), 100: summarize([0.3])})
    by_name = {r.name: r for r in table}
    assert by_name[PER_TURN.format(10, "fsync off")].verdict == "MET"
    assert by_name[PER_TURN.format(10, "fsync on")].verdict == "MET"
    ratio = by_name[RATIO.format(100, "no fsync on either side")]
    assert ratio.figures["ratio"] == pytest.approx(0.05)
    assert ratio.verdict == "MET"
    assert by_name[RATIO.format(100, "fsync on both sides")].verdict == "MISSED"
    assert all(r.verdict in ("MET", "MISSED", "REPORT") for r in table)


def test_per_turn_verdicts_leave_out_creating_the_run() -> None:
    # 10 turns in 19 ms of which creating the run is 9.1: 1.9 ms a turn with it, 1.1 without.
    ours = turns.Side(runs={10: [19.0]}, one_turn=[10.0])
    theirs = turns.Side(runs={10: [100.0]}, one_turn=[55.0])
    sides = {"fsync off": ours, "fsync on": ours}
    sides.update({f"{a} {s}": theirs for a, s in turns.LANGGRAPH})
    by_name = {r.name: r for r in turns.table(sides, {10: 1}, {})}
    row = by_name[PER_TURN.format(10, "fsync on")]
    assert row.figures["p50_ms"] == pytest.approx(1.0)
    assert row.verdict == "MET"
    ratio = by_name[RATIO.format(10, "fsync on both sides")]
    assert ratio.figures["ratio"] == pytest.approx(0.2)  # 1.0 ÷ 5.0, not 1.9 ÷ 10


def test_nothing_measured_misses_instead_of_crashing() -> None:
    sides = {"fsync off": turns.Side(), "fsync on": turns.Side()}
    sides.update({f"{a} {s}": turns.Side() for a, s in turns.LANGGRAPH})
    table = turns.table(sides, {10: 1, 100: 1}, {10: summarize([]), 100: summarize([])})
    assert {r.verdict for r in table} <= {"MISSED", "REPORT"}


@pytest.mark.slow
def test_a_quick_run_of_some_groups_writes_the_result(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "workdir,adapters", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["schema"] == "machina-bench/2"
    assert result["quick"] is True
    assert [g["name"] for g in result["groups"]] == ["adapters", "workdir"]
    assert all(r["verdict"] in ("MET", "MISSED", "REPORT") for g in result["groups"] for r in g["rows"])
    assert out.with_suffix(".md").read_text().count("|") > 10
    assert "verdicts:" in proc.stdout

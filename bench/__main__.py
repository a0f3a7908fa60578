"""``python -m bench``: measure the engine against its performance targets.

Prints one table and writes ``bench-results/bench.json``. Medians of several
repetitions (p95/p99 where the tail matters); every ratio is computed from numbers
measured in this same run, LangGraph included (each side in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import _grpc, adapters, sandbox, workdir
from bench._common import (
    ROOT,
    per_turn_ms,
    progress,
    start_engine,
    start_host,
    stop_engine,
    storage_ratio,
    summarize,
)
from engine_service import LocalStorage


def side_by_side(side: str, turns: int, repeats: int) -> dict[str, Any]:
    """One side of the LangGraph comparison, in its own process (see bench/sidebyside.py)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.sidebyside", side, str(turns), str(repeats)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    result["per_turn"] = summarize(result.pop("per_turn_ms"))
    return result


async def run(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    small, big = (10, 1) if quick else (30, 3)

    progress("side by side with LangGraph (each side in its own process): 10- and 1,000-turn runs")
    for turns, repeats in ((10, small), (1000, big)):
        for side in ("machina", "langgraph"):
            reps = repeats if side == "machina" or turns == 10 else (1 if quick else 2)
            progress(f"  {side}: {turns}-turn runs ×{reps}")
            results[f"{side}_{turns}"] = side_by_side(side, turns, reps)
    results["per_turn_ms_10"] = results["machina_10"]["per_turn"]
    results["per_turn_ms_1000"] = results["machina_1000"]["per_turn"]
    results["per_turn_ratio_1000_vs_10"] = (
        results["per_turn_ms_1000"]["median"] / results["per_turn_ms_10"]["median"]
    )
    for turns in (10, 1000):
        ours, theirs = results[f"machina_{turns}"], results[f"langgraph_{turns}"]
        results[f"vs_langgraph_{turns}"] = ours["per_turn"]["median"] / theirs["per_turn"]["median"]

    progress("request building in the real OpenAI/Anthropic adapters at 10 and 1,000 turns of history")
    for turns in (10, 1000):
        built = adapters.measure(turns, 30)
        results[f"request_build_us_{turns}"] = {name: summarize(v) for name, v in built.items()}

    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        progress("cold start of python -m engine_service to SERVING")
        cold = []
        for _ in range(1 if quick else 3):
            proc, _, seconds = start_engine(storage)
            cold.append(seconds)
            stop_engine(proc)
        results["cold_start_s"] = summarize(cold)

        proc, target, _ = start_engine(storage)
        try:
            progress("1,000 runs paused for approval in one engine process, then a watcher on each")
            results["paused_runs"] = await _grpc.paused_runs_rss(proc, target, 1000)
        finally:
            stop_engine(proc)

        proc, target, _ = start_engine(storage)
        try:
            n_events = 20_000 if quick else 100_000
            progress(f"events/s over one stream, scripted model ({n_events:,} events)")
            eps = await _grpc.scripted_events_per_second(target, n_events, 1 if quick else 3)
            results["events_per_s_scripted"] = summarize(eps["live"])
            results["events_per_s_replay"] = summarize(eps["replay"])
            progress("approval round trips")
            results["approval_rtt_ms"] = summarize(
                await _grpc.approval_round_trips(target, 5 if quick else 20)
            )
            progress("100 concurrent runs of 20 turns")
            results["concurrent_runs"] = await _grpc.concurrent_runs(target, 100, 20)
        finally:
            stop_engine(proc)
        results["storage_bytes_ratio"] = storage_ratio(storage / "workspaces")

        progress("run directory snapshot per checkpoint (200 files): unchanged, one file changed")
        (storage / "workdir").mkdir()
        snap = await workdir.checkpoint_ms(
            LocalStorage(storage / "workdir" / "s"), storage / "workdir" / "w", 20 if quick else 100
        )
        results["workdir_checkpoint_ms"] = {k: summarize(v) for k, v in snap.items()}

        (storage / "host").mkdir()
        host, target = start_host(storage / "host")
        try:
            n_events = 20_000 if quick else 100_000
            progress(f"events/s over one stream, streaming model adapter ({n_events:,} events)")
            live = await _grpc.streamed_events_per_second(target, n_events, BURST, 1, 1 if quick else 3)
            results["events_per_s_live"] = summarize(live)
            per_stream = 2_000 if quick else 10_000
            progress(f"events/s over 50 concurrent streams ({per_stream:,} events each)")
            many = await _grpc.streamed_events_per_second(target, per_stream, BURST, 50, 1 if quick else 3)
            results["events_per_s_50_streams"] = summarize(many)
            progress("token latency: paced model adapter, one delta every 5 ms")
            latency = await _grpc.token_latency_ms(target, 200, 5, 1 if quick else 3)
            results["token_latency_ms"] = summarize(latency)
        finally:
            stop_engine(host)

        progress("handoff round trip (engine → runner → DONE seen by WaitRun), and the same run locally")
        (storage / "handoff").mkdir()
        trips = await _grpc.handoff_round_trips(storage / "handoff", 5 if quick else 20)
        results["handoff_rtt_ms"] = summarize(trips["handoff"])
        results["local_rtt_ms"] = summarize(trips["local"])
    progress("Bash call latency with and without the bubblewrap sandbox, interleaved")
    results["sandbox_bash_ms"] = await sandbox.bash_latency_ms(50 if quick else 300)
    await s3_benchmarks(results, quick)
    return results


# The streaming adapter hands control to the event loop after every BURST chunks, as a
# network adapter does once it has parsed what one socket read brought.
BURST = 50


async def s3_benchmarks(results: dict[str, Any], quick: bool) -> None:
    """Per-turn overhead and handoff time over a real S3-compatible server (moto, on loopback)."""
    from engine_service.testing import CREDENTIALS, S3Storage, new_bucket, running_moto

    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with running_moto() as endpoint, tempfile.TemporaryDirectory() as tmp:
        bucket = await new_bucket(endpoint)
        progress("per-turn overhead on the S3 server, 10-turn runs and one 1,000-turn run")
        small = await per_turn_ms(10, 2 if quick else 5, S3Storage(bucket, "p", endpoint_url=endpoint))
        big = await per_turn_ms(200 if quick else 1000, 1, S3Storage(bucket, "q", endpoint_url=endpoint))
        results["s3_per_turn_ms_10"] = summarize(small)
        results["s3_per_turn_ms_1000"] = summarize(big)
        progress("run directory snapshot per checkpoint on the S3 server")
        s3 = S3Storage(bucket, "w", endpoint_url=endpoint)
        snap = await workdir.checkpoint_ms(s3, Path(tmp) / "w", 5 if quick else 20)
        await s3.close()
        results["s3_workdir_checkpoint_ms"] = {k: summarize(v) for k, v in snap.items()}
        progress("handoff round trip on the S3 server")
        env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
        trips = await _grpc.handoff_round_trips(Path(tmp), 3 if quick else 10, f"s3://{bucket}/h", env)
        results["s3_handoff_rtt_ms"] = summarize(trips["handoff"])
        results["s3_local_rtt_ms"] = summarize(trips["local"])


Row = tuple[str, str, str, str]


def row(name: str, value: str, target: str, met: bool | None) -> Row:
    return (name, value, target, "—" if met is None else ("met" if met else "MISSED"))


def _ms(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ms (p95 {s['p95']:.{digits}f})"


def table(results: dict[str, Any]) -> list[Row]:
    r = results
    t10, t1000 = r["per_turn_ms_10"], r["per_turn_ms_1000"]
    lg10, lg1000 = r["langgraph_10"], r["langgraph_1000"]
    m10, m1000 = r["machina_10"], r["machina_1000"]
    b10, b1000 = r["request_build_us_10"], r["request_build_us_1000"]
    paused, many, tokens = r["paused_runs"], r["concurrent_runs"], r["token_latency_ms"]
    live, scripted = r["events_per_s_live"]["median"], r["events_per_s_scripted"]["median"]
    replay, streams = r["events_per_s_replay"]["median"], r["events_per_s_50_streams"]["median"]
    ratio, vs10, vs1000 = r["per_turn_ratio_1000_vs_10"], r["vs_langgraph_10"], r["vs_langgraph_1000"]
    peaks = (m10["peak_rss_mb"], lg10["peak_rss_mb"], m1000["peak_rss_mb"], lg1000["peak_rss_mb"])
    handoff, s3_handoff = r["handoff_rtt_ms"], r["s3_handoff_rtt_ms"]
    s3_10, s3_1000 = r["s3_per_turn_ms_10"]["median"], r["s3_per_turn_ms_1000"]["median"]
    snap, s3_snap = r["workdir_checkpoint_ms"], r["s3_workdir_checkpoint_ms"]
    approval, cold = r["approval_rtt_ms"], r["cold_start_s"]["median"]

    def build(name: str) -> str:
        now = f"{b10[name]['median']:,.0f} / {b1000[name]['median']:,.0f} µs"
        whole = f"{b10[name + '_baseline']['median']:,.0f} / {b1000[name + '_baseline']['median']:,.0f}"
        return f"{now} (whole history each turn: {whole} µs)"

    return [
        row("engine overhead per turn, 10-turn run", _ms(t10, 3), "p50 ≤ 1 ms", t10["median"] <= 1),
        row("engine overhead per turn, 1,000-turn run", _ms(t1000, 3), "p50 ≤ 1 ms", t1000["median"] <= 1),
        row("per-turn cost, 1,000 ÷ 10 turns", f"{ratio:.2f}×", "≤ 1.2×", ratio <= 1.2),
        row("LangGraph per turn, 10-turn run (same script, SQLite)", _ms(lg10["per_turn"]), "—", None),
        row("LangGraph per turn, 1,000-turn run", _ms(lg1000["per_turn"]), "—", None),
        row("ours ÷ LangGraph per turn, 10 turns", f"{vs10:.3f}×", "≤ 0.2×", vs10 <= 0.2),
        row("ours ÷ LangGraph per turn, 1,000 turns", f"{vs1000:.3f}×", "≤ 0.05×", vs1000 <= 0.05),
        row(
            "peak RSS, ours vs LangGraph (10 / 1,000 turns)",
            "{:.0f} vs {:.0f} MB / {:.0f} vs {:.0f} MB".format(*peaks),
            "lower",
            peaks[0] < peaks[1] and peaks[2] < peaks[3],
        ),
        row(
            "bytes stored by one 1,000-turn run, ours vs LangGraph",
            f"{m1000['storage_bytes'] / 1e6:.2f} MB vs {lg1000['storage_bytes'] / 1e6:,.0f} MB",
            "—",
            None,
        ),
        row(
            "storage bytes ÷ transcript+event bytes",
            f"{r['storage_bytes_ratio']:.2f}×",
            "≤ 2×",
            r["storage_bytes_ratio"] <= 2,
        ),
        row(
            "OpenAI adapter: build one request, 10 / 1,000 turns of history", build("openai"), "report", None
        ),
        row(
            "Anthropic adapter: build one request, 10 / 1,000 turns of history",
            build("anthropic"),
            "report",
            None,
        ),
        row(
            "events/s, one stream, live ExecuteRun (streaming adapter)",
            f"{live:,.0f}",
            "≥ 100,000",
            live >= 1e5,
        ),
        row(
            "events/s, one stream, ExecuteRun of the scripted model",
            f"{scripted:,.0f}",
            "≥ 100,000",
            scripted >= 1e5,
        ),
        row("events/s, one stream, replay StreamRunEvents", f"{replay:,.0f}", "≥ 100,000", replay >= 1e5),
        row(
            "events/s, 50 concurrent ExecuteRun streams together",
            f"{streams:,.0f}",
            "≥ 300,000",
            streams >= 3e5,
        ),
        row(
            "token latency: adapter yields a delta → client has it",
            f"p50 {tokens['median']:.2f} ms, p99 {tokens['p99']:.2f} ms",
            "p50 ≤ 1 ms, p99 ≤ 5 ms",
            tokens["median"] <= 1 and tokens["p99"] <= 5,
        ),
        row(
            "1,000 paused runs in one engine: RSS (idle engine / paused / + a watcher each)",
            f"{paused['idle_mb']:.0f} / {paused['paused_mb']:.0f} / {paused['paused_watched_mb']:.0f} MB",
            "≤ 150 MB",
            paused["paused_watched_mb"] <= 150,
        ),
        row(
            "100 concurrent active runs × 20 turns: all DONE",
            f"{many['turns_per_s']:,.0f} turns/s together",
            "100 at once",
            True,
        ),
        row("approval round trip", _ms(approval), "p50 ≤ 2 ms", approval["median"] <= 2),
        row(
            "handoff round trip, local storage",
            f"{_ms(handoff, 1)}; no handoff: {r['local_rtt_ms']['median']:.1f} ms",
            "p50 ≤ 50 ms",
            handoff["median"] <= 50,
        ),
        row("S3 server: overhead per turn, 10-turn run", _ms(r["s3_per_turn_ms_10"]), "—", None),
        row(
            "S3 server: overhead per turn, 1,000-turn run",
            f"{s3_1000:.2f} ms",
            "flat (≤ 1.2× the 10-turn cost)",
            s3_1000 <= 1.2 * s3_10,
        ),
        row(
            "S3 server: handoff round trip",
            f"{_ms(s3_handoff, 1)}; no handoff: {r['s3_local_rtt_ms']['median']:.1f} ms",
            "p50 ≤ 250 ms",
            s3_handoff["median"] <= 250,
        ),
        row(
            "run directory snapshot per checkpoint, 200 files: unchanged / 1 file changed",
            f"{_ms(snap['unchanged'])} / {_ms(snap['changed'])}",
            "report",
            None,
        ),
        row(
            "the same on the S3 server",
            f"{_ms(s3_snap['unchanged'])} / {_ms(s3_snap['changed'])}",
            "report",
            None,
        ),
        row("cold start of python -m engine_service to SERVING", f"{cold:.2f} s", "≤ 1.5 s", cold <= 1.5),
        sandbox_row(r["sandbox_bash_ms"]),
    ]


def sandbox_row(s: dict[str, Any]) -> Row:
    name = "sandbox: added latency per Bash call (bubblewrap vs unsandboxed, same run)"
    if "unavailable" in s:
        return row(name, f"not measured: {s['unavailable']}", "p50 ≤ 15 ms added", None)
    none, bwrap = s["none"], s["bubblewrap"]
    value = (
        f"+{s['added_p50_ms']:.1f} ms p50, +{s['added_p95_ms']:.1f} ms p95 "
        f"(sandboxed {_ms(bwrap, 1)}; unsandboxed {_ms(none, 1)})"
    )
    return row(name, value, "p50 ≤ 15 ms added", s["added_p50_ms"] <= 15)


def markdown(rows: list[Row]) -> str:
    lines = ["| what | measured | target | status |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'**MISSED**' if d == 'MISSED' else d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test of the harness)")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "bench.json"))
    ns = parser.parse_args(argv)
    results = asyncio.run(run(ns.quick))
    python = platform.python_version()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {python}, {platform.system()}"
    rows = table(results)
    header = ("what", "measured", "target", "status")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    print(f"\nMachina bench — {machine}{' (--quick)' if ns.quick else ''}")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "quick": ns.quick, "results": results, "table": rows}
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

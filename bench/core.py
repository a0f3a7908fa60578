"""The bench's core groups besides per-turn cost (``bench/turns.py``) and S3 (``bench/s3.py``).

Each is ``async def NAME(ctx) -> list[Row]``; ``bench/__main__.py`` lists them.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any

from bench import _grpc, adapters, sandbox, workdir
from bench._common import progress, start_engine, start_host, stop_engine, storage_ratio
from bench._rows import Check, Row, Target, at_least, at_most, ms, not_available, row, summarize
from engine_service import LocalStorage

# The streaming adapter hands control to the event loop after every BURST chunks, as a
# network adapter does once it has parsed what one socket read brought.
BURST = 50


async def adapters_group(ctx: Any) -> list[Row]:
    progress("request building in the real OpenAI/Anthropic adapters at 10 and 1,000 turns of history")
    built = {turns: adapters.measure(turns, 30) for turns in (10, 1000)}
    out = []
    for name, title in (("openai", "OpenAI"), ("anthropic", "Anthropic")):
        now = [summarize(built[t][name])["median"] for t in (10, 1000)]
        whole = [summarize(built[t][f"{name}_baseline"])["median"] for t in (10, 1000)]
        out.append(row(
            f"{title} adapter: build one request, 10 / 1,000 turns of history",
            f"{now[0]:,.0f} / {now[1]:,.0f} µs "
            f"(whole history each turn: {whole[0]:,.0f} / {whole[1]:,.0f} µs)",
            {"us_10": now[0], "us_1000": now[1], "whole_us_10": whole[0], "whole_us_1000": whole[1]},
        ))  # fmt: skip
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def streams_group(ctx: Any) -> list[Row]:
    quick = ctx.quick
    repeats = 1 if quick else 3
    n_events = 20_000 if quick else 100_000
    out: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        proc, target, _ = start_engine(storage)
        try:
            progress(f"events/s over one stream, scripted model ({n_events:,} events), and its replay")
            eps = await _grpc.scripted_events_per_second(target, n_events, repeats)
            words = 400 if quick else 2_000
            progress(
                f"events/s over 50 concurrent streams of the scripted model, one engine ({words:,} each)"
            )
            one = await _grpc.scripted_streams_per_second(target, 50, words, repeats, [proc.pid])
        finally:
            stop_engine(proc)
        live, replay = summarize(eps["live"]), summarize(eps["replay"])
        for name, s in (("ExecuteRun of the scripted model", live), ("replay StreamRunEvents", replay)):
            out.append(row(
                f"events/s, one stream, {name}", f"{s['median']:,.0f}", {"events_per_s": s["median"]},
                at_least("events_per_s", 1e5, "≥ 100,000"), {"events_per_s": s},
            ))  # fmt: skip
        out.append(await _two_processes(storage, words, repeats, summarize(one["events_per_s"])))

        (storage / "host").mkdir()
        host, target = start_host(storage / "host")
        try:
            progress(f"events/s over one stream, streaming model adapter ({n_events:,} events)")
            single = summarize(await _grpc.streamed_events_per_second(target, n_events, BURST, 1, repeats))
            per_stream = 2_000 if quick else 10_000
            progress(f"events/s over 50 concurrent streams, streaming adapter ({per_stream:,} events each)")
            many = summarize(await _grpc.streamed_events_per_second(target, per_stream, BURST, 50, repeats))
            progress("token latency: paced model adapter, one delta every 5 ms")
            tokens = summarize(await _grpc.token_latency_ms(target, 200, 5, repeats))
        finally:
            stop_engine(host)
    out.insert(0, row(
        "events/s, one stream, live ExecuteRun (streaming adapter)", f"{single['median']:,.0f}",
        {"events_per_s": single["median"]},
        at_least("events_per_s", 1e5, "≥ 100,000"),
        {"events_per_s": single},
    ))  # fmt: skip
    out.append(row(
        "events/s, 50 concurrent ExecuteRun streams together (streaming adapter, one engine)",
        f"{many['median']:,.0f} ({many['min']:,.0f}–{many['max']:,.0f})",
        {"events_per_s": many["median"]}, at_least("events_per_s", 3e5, "≥ 300,000"), {"events_per_s": many},
    ))  # fmt: skip
    out.append(row(
        "token latency: adapter yields a delta → client has it",
        f"p50 {tokens['median']:.2f} ms, p99 {tokens['p99']:.2f} ms",
        {"p50_ms": tokens["median"], "p99_ms": tokens["p99"]},
        Target("p50 ≤ 1 ms, p99 ≤ 5 ms", (Check("p50_ms", "<=", 1), Check("p99_ms", "<=", 5))),
        {"latency_ms": tokens},
    ))  # fmt: skip
    return out


async def _two_processes(storage: Path, words: int, repeats: int, one: dict[str, float]) -> Row:
    """50 scripted streams over two engine processes sharing storage and one port (SO_REUSEPORT)."""
    name = "events/s, 50 concurrent streams of the scripted model: 2 engine processes vs 1"
    shared = storage / "shared"
    shared.mkdir()
    listen = f"127.0.0.1:{_free_port()}"
    procs = []
    try:
        for tag in ("a", "b"):
            try:
                proc, _, _ = start_engine(shared, listen=listen, args=["--reuse-port"], name=tag)
            except RuntimeError as exc:
                if "--reuse-port" in str(exc) or "unrecognized arguments" in str(exc):
                    return not_available(name, "the engine has no --reuse-port option", "≥ 300,000")
                raise
            procs.append(proc)
        progress(
            "events/s over 50 concurrent streams of the scripted model, two engine processes on one port"
        )
        two = await _grpc.scripted_streams_per_second(listen, 50, words, repeats, [p.pid for p in procs])
    finally:
        for proc in procs:
            stop_engine(proc)
    s, share = summarize(two["events_per_s"]), summarize(two["cpu_share"])
    return row(
        name,
        f"{s['median']:,.0f} vs {one['median']:,.0f} "
        f"(the less busy process did {share['median']:.0%} of the work)",
        {
            "events_per_s": s["median"],
            "one_process_events_per_s": one["median"],
            "cpu_share": share["median"],
        },
        at_least("events_per_s", 3e5, "≥ 300,000"),
        {"two_processes": s, "one_process": one, "cpu_share": share},
    )


async def runs_group(ctx: Any) -> list[Row]:
    quick = ctx.quick
    out: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        progress("cold start of python -m engine_service to SERVING")
        cold = []
        for _ in range(1 if quick else 3):
            proc, _, seconds = start_engine(storage)
            cold.append(seconds)
            stop_engine(proc)
        c = summarize(cold)
        out.append(row(
            "cold start of python -m engine_service to SERVING", f"{c['median']:.2f} s (max {c['max']:.2f})",
            {"seconds": c["median"]}, at_most("seconds", 1.5, "≤ 1.5 s"), {"seconds": c},
        ))  # fmt: skip
        proc, target, _ = start_engine(storage)
        try:
            progress("1,000 runs paused for approval in one engine process, then a watcher on each")
            paused = await _grpc.paused_runs_rss(proc, target, 1000)
        finally:
            stop_engine(proc)
        out.append(row(
            "1,000 paused runs in one engine: RSS (idle engine / paused / + a watcher each)",
            f"{paused['idle_mb']:.0f} / {paused['paused_mb']:.0f} / {paused['paused_watched_mb']:.0f} MB",
            {"watched_mb": paused["paused_watched_mb"], "paused_mb": paused["paused_mb"]},
            at_most("watched_mb", 150, "≤ 150 MB"), paused,
        ))  # fmt: skip
        proc, target, _ = start_engine(storage)
        try:
            progress("approval round trips")
            approval = summarize(await _grpc.approval_round_trips(target, 5 if quick else 30))
            progress("100 concurrent runs of 20 turns")
            many = await _grpc.concurrent_runs(target, 100, 20)
        finally:
            stop_engine(proc)
        out.append(row(
            "approval round trip (ResumeRun → a watcher sees the next event)", ms(approval),
            {"p50_ms": approval["median"], "p95_ms": approval["p95"]},
            at_most("p50_ms", 1.5, "p50 ≤ 1.5 ms"), {"rtt_ms": approval},
        ))  # fmt: skip
        out.append(row(
            "100 concurrent runs × 20 turns (CreateRun all, then WaitRun each)",
            f"{many['done']:.0f} of {many['runs']:.0f} DONE; {many['turns_per_s']:,.0f} turns/s together",
            {"done": many["done"], "turns_per_s": many["turns_per_s"]},
            at_least("done", many["runs"], f"all {many['runs']:.0f} DONE"), many,
        ))  # fmt: skip
        ratio = storage_ratio(storage / "workspaces")
        out.append(row(
            "storage bytes ÷ transcript+event bytes (every run above)", f"{ratio:.2f}×",
            {"ratio": ratio}, at_most("ratio", 2, "≤ 2×"),
        ))  # fmt: skip
    return out


async def handoff_group(ctx: Any) -> list[Row]:
    quick = ctx.quick
    with tempfile.TemporaryDirectory() as tmp:
        progress("handoff round trip (engine → runner → DONE seen by WaitRun), and the same run locally")
        trips = await _grpc.handoff_round_trips(Path(tmp), 5 if quick else 20)
    h, local = summarize(trips["handoff"]), summarize(trips["local"])
    return [row(
        "handoff round trip, local storage", f"{ms(h, 1)}; the same run without a handoff: {ms(local, 1)}",
        {"p50_ms": h["median"], "p95_ms": h["p95"], "local_p50_ms": local["median"]},
        at_most("p50_ms", 50, "p50 ≤ 50 ms"), {"handoff_ms": h, "local_ms": local},
    )]  # fmt: skip


async def workdir_group(ctx: Any) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        progress("run directory snapshot per checkpoint (200 files): unchanged, one file changed")
        storage = LocalStorage(Path(tmp) / "s")
        snap = await workdir.checkpoint_ms(storage, Path(tmp) / "w", 20 if ctx.quick else 100)
        await storage.close()
    u, c = summarize(snap["unchanged"]), summarize(snap["changed"])
    return [row(
        "run directory snapshot per checkpoint, 200 files: unchanged / 1 file changed",
        f"{ms(u)} / {ms(c)}", {"unchanged_p50_ms": u["median"], "changed_p50_ms": c["median"]},
        None, {"unchanged_ms": u, "changed_ms": c},
    )]  # fmt: skip


async def sandbox_group(ctx: Any) -> list[Row]:
    progress("Bash call latency with and without the bubblewrap sandbox, interleaved")
    s = await sandbox.bash_latency_ms(50 if ctx.quick else 300)
    name = "sandbox: added latency per Bash call (bubblewrap vs unsandboxed, same run)"
    if "unavailable" in s:
        return [not_available(name, s["unavailable"], "p50 ≤ 15 ms added")]
    none, bwrap = s["none"], s["bubblewrap"]
    value = (
        f"+{s['added_p50_ms']:.1f} ms p50, +{s['added_p95_ms']:.1f} ms p95 "
        f"(sandboxed {ms(bwrap, 1)}; unsandboxed {ms(none, 1)})"
    )
    figures = {"added_p50_ms": s["added_p50_ms"], "added_p95_ms": s["added_p95_ms"]}
    return [row(name, value, figures, at_most("added_p50_ms", 15, "p50 ≤ 15 ms added"), s)]

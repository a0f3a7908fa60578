"""The engine on an S3-compatible server (moto, on loopback), beside that server's own round trip.

Raw ``PutObject`` and ``GetObject`` of 1 KiB through the same client library the engine uses
(aioboto3), before and after the engine's runs, so a slow server or a busy machine shows up in
both. Per turn: a ``python -m engine_service --storage s3://…`` process and the script of
``bench/turns.py`` (Write, then Edit every turn) through gRPC. Handoff: the one-Bash-step run
of ``bench/_grpc.handoff_round_trips`` with engine and runner on the S3 server. Requests per
turn: another engine process whose S3 traffic goes through a counting proxy (``bench/_s3count``),
a 1-turn and an N-turn run: ``(requests(N) − requests(1)) ÷ (N − 1)`` by kind, load-independent.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _grpc, workdir
from bench._common import channel, progress, start_engine, stop_engine
from bench._rows import Check, Row, Target, at_most, ms, row, summarize
from bench._s3count import CountingProxy
from bench.turns import Side, one_run
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc


async def raw_round_trips(endpoint: str, bucket: str, repeats: int) -> dict[str, list[float]]:
    import aioboto3

    out: dict[str, list[float]] = {"put": [], "get": []}
    body = os.urandom(1024)
    async with aioboto3.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        for i in range(repeats + 3):
            started = time.perf_counter()
            await s3.put_object(Bucket=bucket, Key=f"raw/{i}", Body=body)
            put = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            response = await s3.get_object(Bucket=bucket, Key=f"raw/{i}")
            async with response["Body"] as stream:
                await stream.read()
            get = (time.perf_counter() - started) * 1000
            if i >= 3:  # warm-up
                out["put"].append(put)
                out["get"].append(get)
    return out


async def requests_per_turn(endpoint: str, bucket: str, tmp: Path, turns: int) -> dict[str, float]:
    """S3 requests per turn by kind (``PUT state``, ``GET blob cancel-request``, …), excluding
    what creating and finishing a run costs; ``PUT``/``GET``/``LIST``/``all`` sum them."""
    from engine_service.testing import CREDENTIALS

    proxy = CountingProxy(endpoint)
    await proxy.start()
    try:
        env = {"AWS_ENDPOINT_URL": proxy.url, **CREDENTIALS}
        proc, target, _ = start_engine(tmp, env, f"s3://{bucket}/c", name="counted")
        try:
            async with channel(target) as ch:
                stub = svc_grpc.EngineServiceStub(ch)
                await one_run(stub, 3)  # warm-up
                before = proxy.snapshot()
                await one_run(stub, 1)
                one = proxy.snapshot() - before
                before = proxy.snapshot()
                await one_run(stub, turns)
                many = proxy.snapshot() - before
        finally:
            stop_engine(proc)
    finally:
        await proxy.stop()
    per_turn = {kind: (many[kind] - one[kind]) / (turns - 1) for kind in set(one) | set(many)}
    out: dict[str, float] = {kind: n for kind, n in sorted(per_turn.items()) if n}
    for verb in ("PUT", "GET", "LIST"):
        out[verb] = sum(n for kind, n in per_turn.items() if kind.startswith(verb + " "))
    out["all"] = sum(per_turn.values())
    return out


async def rows(ctx: Any) -> list[Row]:
    from engine_service.testing import CREDENTIALS, S3Storage, new_bucket, running_moto

    quick = ctx.quick
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    small, big = 10, 100 if quick else 1000
    side = Side()
    with running_moto() as endpoint, tempfile.TemporaryDirectory() as tmp:
        bucket = await new_bucket(endpoint)
        env = {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS}
        progress("S3 server: raw PUT and GET round trips")
        raw = await raw_round_trips(endpoint, bucket, 20 if quick else 50)
        proc, target, _ = start_engine(Path(tmp), env, f"s3://{bucket}/t")
        try:
            progress(f"S3 server: per turn through gRPC, {small}-turn runs and one {big:,}-turn run")
            async with channel(target) as ch:
                stub = svc_grpc.EngineServiceStub(ch)
                await one_run(stub, small)  # warm-up
                for _ in range(3 if quick else 5):
                    side.one_turn.append((await one_run(stub, 1))[0])
                    side.runs.setdefault(small, []).append((await one_run(stub, small))[0])
                side.runs[big] = [(await one_run(stub, big))[0]]
        finally:
            stop_engine(proc)
        progress("S3 server: raw PUT and GET round trips again")
        after = await raw_round_trips(endpoint, bucket, 20 if quick else 50)
        progress("S3 server: handoff round trip")
        (Path(tmp) / "h").mkdir()
        trips = await _grpc.handoff_round_trips(Path(tmp) / "h", 3 if quick else 20, f"s3://{bucket}/h", env)
        progress("S3 server: requests per turn, through a counting proxy")
        counted = await requests_per_turn(endpoint, bucket, Path(tmp), 21)
        progress("S3 server: run directory snapshot per checkpoint")
        s3 = S3Storage(bucket, "w", endpoint_url=endpoint)
        snap = await workdir.checkpoint_ms(s3, Path(tmp) / "w", 5 if quick else 20)
        await s3.close()
    put, get = summarize(raw["put"] + after["put"]), summarize(raw["get"] + after["get"])
    per_turn, growth_small = side.per_turn(small), side.growth_per_turn(small)
    per_turn_big, growth_big = side.per_turn(big), side.growth_per_turn(big)
    # A turn's cost is measured with creating the run left out, as the local rows are
    # (bench/turns.py): ``(T(N) − T(1)) ÷ (N − 1)``; the figure with it is reported beside.
    in_puts = growth_small["median"] / put["median"]
    big_in_puts = growth_big["median"] / put["median"]
    with_creation = per_turn["median"] / put["median"]
    growth = growth_big["median"] / growth_small["median"] if growth_small["median"] > 0 else float("nan")
    handoff, local = summarize(trips["handoff"]), summarize(trips["local"])
    u, c = summarize(snap["unchanged"]), summarize(snap["changed"])
    kinds = ", ".join(f"{kind} {n:.2f}" for kind, n in counted.items() if " " in kind)
    return [
        row(
            "S3 server: one 1 KiB PUT / GET round trip (same server, same run)",
            f"PUT {ms(put)}; GET {ms(get)}",
            {"put_p50_ms": put["median"], "get_p50_ms": get["median"]}, None, {"put_ms": put, "get_ms": get},
        ),
        row(
            f"S3 server: per turn through gRPC, creating the run left out, {small}-turn run (Edit tool)",
            f"{ms(growth_small, 2, 'range')} = {in_puts:.1f} PUTs; with it "
            f"{per_turn['median']:.2f} ms = {with_creation:.1f} PUTs",
            {"p50_ms": growth_small["median"], "in_puts": in_puts, "with_creation_ms": per_turn["median"],
             "in_puts_with_creation": with_creation},
            at_most("in_puts", 1.5, "≤ 1.5× one PUT"), {"per_turn_ms": per_turn, "growth_ms": growth_small},
        ),
        row(
            f"S3 server: per turn through gRPC, creating the run left out, {big:,}-turn run; "
            f"growth {big:,} ÷ {small}",
            f"{growth_big['median']:.2f} ms = {big_in_puts:.1f} PUTs; growth {growth:.2f}×",
            {"p50_ms": growth_big["median"], "in_puts": big_in_puts, "growth": growth},
            Target(
                "≤ 1.5× one PUT, growth ≤ 1.2×",
                (Check("in_puts", "<=", 1.5), Check("growth", "<=", 1.2)),
            ),
            {"per_turn_ms": per_turn_big, "growth_ms": growth_big},
        ),
        row(
            "S3 server: requests per turn (Edit tool, 21-turn run, counted at the server)",
            f"{counted['all']:.2f} requests: {counted['PUT']:.2f} PUT, {counted['GET']:.2f} GET, "
            f"{counted['LIST']:.2f} LIST ({kinds}); per turn {growth_small['median']:.2f} ms = "
            f"{in_puts:.1f} × one PUT ({put['median']:.2f} ms), "
            f"{growth_small['median'] / get['median']:.1f} × one GET",
            {"requests": counted["all"], "puts": counted["PUT"], "gets": counted["GET"],
             "lists": counted["LIST"]},
            None, {"requests_per_turn": counted},
        ),
        row(
            "S3 server: handoff round trip (p95 beside)",
            f"{ms(handoff, 1)}; the same run without a handoff: {ms(local, 1)}",
            {"p50_ms": handoff["median"], "p95_ms": handoff["p95"], "local_p50_ms": local["median"]},
            at_most("p50_ms", 250, "p50 ≤ 250 ms"), {"handoff_ms": handoff, "local_ms": local},
        ),
        row(
            "S3 server: run directory snapshot per checkpoint, 200 files: unchanged / 1 file changed",
            f"{ms(u)} / {ms(c)}", {"unchanged_p50_ms": u["median"], "changed_p50_ms": c["median"]},
            None, {"unchanged_ms": u, "changed_ms": c},
        ),
    ]  # fmt: skip

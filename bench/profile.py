"""``python -m bench.profile WHAT``: profile the engine process on one benchmark (pyinstrument).

WHAT is ``streams`` (50 concurrent ExecuteRun streams of a bursting model),
``stream`` (one), ``scripted`` (one ExecuteRun of the scripted model, then its replay)
or ``turns`` (in-process 1,000-turn runs, no gRPC). The engine runs under
pyinstrument in its own process and the text report is written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from bench import _grpc
from bench._common import per_turn_ms, start_host, stop_engine


async def profile(what: str, out: Path) -> None:
    if what == "turns":
        from pyinstrument import Profiler

        with Profiler() as profiler:
            await per_turn_ms(1000, 3)
        await asyncio.to_thread(out.write_text, profiler.output_text())
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_host(Path(tmp), profile=out)
        try:
            if what == "streams":
                print(await _grpc.streamed_events_per_second(target, 20_000, 64, 50, 2))
            elif what == "stream":
                print(await _grpc.streamed_events_per_second(target, 100_000, 64, 1, 3))
            elif what == "scripted":
                print(await _grpc.scripted_events_per_second(target, 100_000, 3))
            else:
                raise SystemExit(f"unknown benchmark {what!r}")
        finally:
            stop_engine(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["streams", "stream", "scripted", "turns"])
    parser.add_argument("--out", default="bench-results/profile.txt")
    ns = parser.parse_args(argv)
    out = Path(ns.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(profile(ns.what, out))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

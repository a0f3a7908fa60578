"""``python -m bench.host``: the engine's gRPC server with benchmark model adapters.

The same ``Engine`` and ``start_server`` as ``python -m engine_service``; only the
model factory differs: provider ``openai`` is mapped to ``BenchModel``, whose
behaviour the model name selects (no network, no key):

- ``burst-N-B``: N text chunks, handing control to the event loop after every B of
  them, as a network adapter does when it has parsed what one socket read brought;
- ``paced-N-MS``: N chunks MS milliseconds apart; each chunk's text is the
  ``time.perf_counter_ns()`` at which the adapter yielded it, so a client on the same
  machine (CLOCK_MONOTONIC is system-wide) can tell how long the engine took to show it.

Provider ``scripted`` works as usual. Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from engine_service import Engine, EngineConfig, LocalStorage, ToolRegistry
from engine_service.models import ModelAdapter, ModelRequest, TextChunk, TurnResult
from engine_service.testing import ASK_USER, SAMPLE_TOOLS, Usage, start_server


class BenchModel:
    """A model adapter that streams text in a chosen rhythm (see the module doc)."""

    def __init__(self, name: str) -> None:
        kind, count, param = name.split("-")
        if kind not in ("burst", "paced"):
            raise ValueError(f"unknown bench model {name!r}")
        self._name = name
        self._paced = kind == "paced"
        self._count = int(count)
        self._param = float(param)

    @property
    def provider(self) -> str:
        return "openai"

    @property
    def name(self) -> str:
        return self._name

    async def stream(self, request: ModelRequest) -> AsyncIterator[TextChunk | TurnResult]:
        if self._paced:
            interval = self._param / 1000
            for _ in range(self._count):
                await asyncio.sleep(interval)
                yield TextChunk(f"{time.perf_counter_ns()} ")
        else:
            burst = int(self._param)
            for i in range(self._count):
                if i % burst == 0:
                    await asyncio.sleep(0)
                yield TextChunk("w ")
        yield TurnResult("(streamed)", [], Usage(0, self._count), "end_turn")

    async def aclose(self) -> None:
        return None


def model_factory(provider: str, name: str) -> ModelAdapter:
    if provider != "openai":
        raise ValueError(f"the bench host has no {provider!r} models")
    return BenchModel(name)


async def serve(
    storage: Path, port_file: Path, listen: str = "127.0.0.1:0", reuse_port: bool = False
) -> None:
    config = EngineConfig(max_turns=100_000, workdir_root=str(storage / "work"))
    tools = ToolRegistry([ASK_USER, *SAMPLE_TOOLS])
    engine = Engine(config, LocalStorage(storage), tools=tools, model_factory=model_factory)
    running = await start_server(engine, listen, max_message_bytes=64 << 20, reuse_port=reuse_port)
    await asyncio.to_thread(port_file.write_text, str(running.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument(
        "--reuse-port", action="store_true", help="share --listen with other hosts (SO_REUSEPORT)"
    )
    ns = parser.parse_args(argv)
    asyncio.run(serve(Path(ns.storage), Path(ns.port_file), ns.listen, ns.reuse_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

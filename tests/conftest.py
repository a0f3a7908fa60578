"""Shared fixtures: a real EngineService on 127.0.0.1 port 0, and the public client."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient, AsyncRunHandle, Resumed, Run, RunEvent
from engine_service import Engine, EngineConfig, LocalStorage, ToolRegistry
from engine_service.testing import Principal, Resolver, RunningServer, builtin_tools, start_server
from tests import tools as test_tools
from tests.webhook_receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent
# Keep a developer's real API keys out of tests: the scripted model is the default.
for _key in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
    os.environ.pop(_key, None)


def undone_seqs(events: list[RunEvent]) -> set[int]:
    """Seqs a crash undid: from each recovery's ``rolled_back_from_seq`` up to its ``resumed``."""
    undone: set[int] = set()
    for e in events:
        if isinstance(e, Resumed) and e.rolled_back_from_seq:
            assert e.resumed_by == "recovery"
            assert 0 < e.rolled_back_from_seq < e.seq
            assert not undone & set(range(e.rolled_back_from_seq, e.seq)), "undone ranges overlap"
            undone.update(range(e.rolled_back_from_seq, e.seq))
    return undone


def turn(text: str = "", *calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """One scripted turn for the client's ``script=`` argument."""
    return {"text": text, "tool_calls": [{"name": n, "arguments": a} for n, a in calls]}


async def refresh_until(
    handle: AsyncRunHandle, *states: str, tries: int = 200, interval: float = 0.05
) -> Run:
    """Refresh ``handle`` until its run is in one of ``states`` or ``tries`` refreshes were made,
    ``interval`` seconds apart; return the last Run (the caller asserts on it)."""
    run = await handle.refresh()
    for _ in range(tries - 1):
        if run.state in states:
            break
        await asyncio.sleep(interval)
        run = await handle.refresh()
    return run


def build_engine(
    root: Path,
    *,
    config: dict[str, Any] | None = None,
    clock: Callable[[], float] | None = None,
    resolver: Resolver | None = None,
    model_factory: Callable[[str, str], Any] | None = None,
) -> Engine:
    """An Engine over LocalStorage at ``root`` with the built-in and the test tools (not started).

    ``config`` is merged over the storage and run-directory settings; ``resolver`` answers the
    egress policy's DNS questions (default: the system's)."""
    cfg = EngineConfig.model_validate(
        {"storage": str(root), "workdir_root": str(root / "workdirs"), **(config or {})}
    )
    kwargs: dict[str, Any] = {"clock": clock} if clock else {}
    if model_factory is not None:
        kwargs["model_factory"] = model_factory
    egress = cfg.egress_policy(resolver)
    tools = ToolRegistry([*builtin_tools(cfg, egress), *test_tools.ALL])
    return Engine(cfg, LocalStorage(root), tools=tools, egress=egress, **kwargs)


class ServerFactory:
    """Starts engine servers over one storage root (so tests can 'restart' the engine)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: list[RunningServer] = []

    async def start(
        self,
        *,
        config: dict[str, Any] | None = None,
        api_keys: dict[str, Principal] | None = None,
        clock: Callable[[], float] | None = None,
        resolver: Resolver | None = None,
        model_factory: Callable[[str, str], Any] | None = None,
    ) -> RunningServer:
        """``resolver`` answers the egress policy's DNS questions (default: the system's);
        ``model_factory`` builds the non-scripted models (default: the real adapters)."""
        engine = build_engine(
            self.root, config=config, clock=clock, resolver=resolver, model_factory=model_factory
        )
        server = await start_server(engine, "127.0.0.1:0", api_keys=api_keys)
        self.running.append(server)
        return server

    async def stop_all(self) -> None:
        while self.running:
            await self.running.pop().stop(0.5)


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    factory = ServerFactory(tmp_path / "storage")
    yield factory
    await factory.stop_all()


@pytest.fixture
async def server(servers: ServerFactory) -> RunningServer:
    return await servers.start(config={"tools": {"permissions": {"double": "ask"}}})


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncEngineClient]:
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def moto() -> Iterator[str]:
    """A real S3-compatible server process (moto_server) for the whole session, started on first use."""
    from tests.s3_server import CREDENTIALS, running_moto

    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with running_moto() as url:
        yield url


@pytest.fixture(scope="session")
def httpbin() -> Iterator[str]:
    """The third-party httpbin app in a real server process for the whole session, started on first use."""
    from tests.httpbin_server import running_httpbin

    with running_httpbin() as url:
        yield url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real local webhook receiver answering 200."""
    r = Receiver()
    yield r
    r.close()

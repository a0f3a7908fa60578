"""Fixtures of the control-plane tests: one PostgreSQL cluster per session, a database per test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine_service import Engine, EngineConfig, LocalStorage, ToolRegistry
from engine_service.control import PostgresControl
from engine_service.testing import RunningServer, builtin_tools, start_server
from tests import tools as test_tools
from tests.postgres_server import new_database, running_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture
async def database(postgres: str) -> str:
    """The URL of an empty database of its own."""
    return await new_database(postgres)


class Replicas:
    """In-process engine servers over one storage root and one control-plane database."""

    def __init__(self, root: Path, database: str) -> None:
        self.root = root
        self.database = database
        self.running: list[RunningServer] = []

    async def start(
        self,
        *,
        config: dict[str, Any] | None = None,
        max_running: int = 0,
        control_url: str = "",
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> RunningServer:
        control_url = control_url or self.database
        cfg = EngineConfig.model_validate(
            {
                "storage": str(self.root),
                "workdir_root": str(self.root / "workdirs"),
                "control_url": control_url,
                "workspace_max_running": max_running,
                **(config or {}),
            }
        )
        tools = ToolRegistry([*builtin_tools(cfg, cfg.egress_policy()), *test_tools.ALL])
        control = PostgresControl(control_url, max_running=max_running, connect_timeout=connect_timeout)
        engine = Engine(cfg, LocalStorage(self.root), tools=tools, control=control, clock=clock)
        server = await start_server(engine, "127.0.0.1:0")
        self.running.append(server)
        return server

    async def stop_all(self) -> None:
        while self.running:
            await self.running.pop().stop(0.5)


@pytest.fixture
async def replicas(tmp_path: Path, database: str) -> AsyncIterator[Replicas]:
    factory = Replicas(tmp_path / "storage", database)
    yield factory
    await factory.stop_all()


class PgProxy:
    """A TCP proxy in front of PostgreSQL that can stall (the database stops answering, as if
    paused: connections stay open, nothing flows) and resume."""

    def __init__(self, database: str) -> None:
        self._host_port = database.split("@", 1)[1].split("/", 1)[0]
        self._database = database
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._links: list[asyncio.StreamWriter] = []
        self.url = ""

    async def start(self) -> PgProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = self._database.replace(self._host_port, f"127.0.0.1:{port}")
        return self

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self._flowing.set()
        for link in self._links:
            link.close()
        if self._server is not None:
            self._server.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self._host_port.rpartition(":")
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        self._links.extend([writer, up_writer])
        with contextlib.suppress(Exception):
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))


@pytest.fixture
async def pg_proxy(database: str) -> AsyncIterator[PgProxy]:
    proxy = await PgProxy(database).start()
    yield proxy
    await proxy.close()

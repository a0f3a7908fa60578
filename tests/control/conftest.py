"""Fixtures of the control-plane tests: one PostgreSQL cluster per session, a database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
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

    async def start(self, *, config: dict[str, Any] | None = None, max_running: int = 0) -> RunningServer:
        cfg = EngineConfig.model_validate(
            {
                "storage": str(self.root),
                "workdir_root": str(self.root / "workdirs"),
                "control_url": self.database,
                "workspace_max_running": max_running,
                **(config or {}),
            }
        )
        tools = ToolRegistry([*builtin_tools(cfg, cfg.egress_policy()), *test_tools.ALL])
        control = PostgresControl(self.database, max_running=max_running)
        engine = Engine(cfg, LocalStorage(self.root), tools=tools, control=control)
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

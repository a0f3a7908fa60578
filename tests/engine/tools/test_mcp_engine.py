"""MCP tools in real runs: permissions, per-run selection, and a stdio server only the runner can start."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient, InvalidRequestError, ToolCallCompleted
from tests.conftest import ServerFactory, turn
from tests.processes import EngineProcess, RunnerProcess

TIME_SERVER = {
    "name": "time",
    "transport": "stdio",
    "command": sys.executable,
    "args": ["-m", "mcp_server_time", "--local-timezone", "UTC"],
}
NOW = ("mcp__time__get_current_time", {"timezone": "UTC"})


async def test_mcp_tools_in_a_run_follow_the_permission_policy(servers: ServerFactory) -> None:
    permissions = {"mcp__time__get_current_time": "ask"}
    srv = await servers.start(config={"tools": {"mcp_servers": [TIME_SERVER], "permissions": permissions}})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        handle = await client.create(
            "what time is it?", model="scripted", script=[turn("", NOW), turn("Got it.")]
        )
        run = await handle.wait(timeout=30)
        assert run.pause_reason == "AWAITING_APPROVAL"
        assert run.interrupts[0].tool_name == "mcp__time__get_current_time"
        assert run.interrupts[0].input_schema is not None
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=30)
        assert run.state == "DONE"
        (result,) = [e async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]
    assert not result.is_error
    assert '"timezone": "UTC"' in result.output
    assert "datetime" in result.output


async def test_per_run_mcp_server_selection(servers: ServerFactory) -> None:
    srv = await servers.start(config={"tools": {"mcp_servers": [TIME_SERVER]}})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        run = await client.execute(
            "t", model="scripted", script=[turn("", NOW), turn("ok")], mcp_servers=[]
        ).result()
        docs = await srv.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
        assert "Unknown tool 'mcp__time__get_current_time'" in docs[2]["text"]
        run = await client.execute(
            "t", model="scripted", script=[turn("", NOW), turn("ok")], mcp_servers=["time"]
        ).result()
        docs = await srv.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
        assert docs[2]["is_error"] is False
        with pytest.raises(InvalidRequestError) as caught:
            await client.create("t", model="scripted", script=[turn("x")], mcp_servers=["nope"])
        assert "nope" in caught.value.message


@pytest.mark.slow
async def test_a_stdio_mcp_server_only_the_runner_can_start(tmp_path: Path) -> None:
    config = tmp_path / "mcp.toml"
    config.write_text(
        "[[tools.mcp_servers]]\n"
        f'name = "time"\ntransport = "stdio"\ncommand = "{sys.executable}"\n'
        'args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]\n'
    )
    env: dict[str, Any] = {
        "MACHINA_STORAGE": str(tmp_path / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp_path / "work"),
        "MACHINA_RUNNER_SECRET": "mcp-runner-secret-123",
    }
    # The runner starts first: it can start the stdio server and publishes its tools.
    runner = RunnerProcess(tmp_path, "--config", str(config), env=env)
    engine = EngineProcess(
        tmp_path, "--config", str(config), "--capabilities-subprocess", "false",
        env={**env, "MACHINA_RUNNER_URL": f"{runner.http}/continue"},
    )  # fmt: skip
    try:
        async with AsyncEngineClient(engine.target) as client:
            sync_run = await client.execute(
                "t", model="scripted", script=[turn("", NOW), turn("ok")]
            ).result()
            assert sync_run.meta.capabilities_missing == ["mcp__time__get_current_time"]
            handle = await client.create(
                "what time is it?", model="scripted", script=[turn("", NOW), turn("ok")]
            )
            events = [e async for e in handle.events(follow=True)]
            run = await handle.wait(timeout=30)
    finally:
        engine.close()
        runner.close()
    assert run.state == "DONE"
    kinds = [e.kind for e in events]
    assert "handoff_to_runner" in kinds
    (result,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert not result.is_error
    assert '"timezone": "UTC"' in result.output

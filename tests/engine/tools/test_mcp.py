"""MCP servers' tools in the catalogue, against real servers.

Third-party servers from PyPI: ``mcp-server-time`` (the MCP project's reference server,
stdio) and ``stamp-mcp`` (a hand-written streamable-HTTP server with no MCP SDK inside),
plus our own misbehaving server in tests/mcp_servers/flaky.py for crashes and hangs.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mcp import types as mt
from pydantic import ValidationError

from engine_service.tools import McpServerConfig, select_servers
from engine_service.tools._mcp import McpManager, render_content
from engine_service.tools._registry import Tool, ToolContext, ToolError, ToolRegistry, call_tool
from tests.conftest import ROOT
from tests.mcp_servers.flaky import PNG
from tests.processes import free_port

FLAKY = ROOT / "tests" / "mcp_servers" / "flaky.py"
BIN = Path(sys.executable).parent
CTX = ToolContext(run_id="run-1", workspace_id="ws-1", call_id="call-1")

pytestmark = pytest.mark.timeout(60)


def children() -> set[int]:
    """Our direct child processes (zombies included: an unreaped child is a leak too)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def gone(pid: int, deadline_s: float = 5.0) -> None:
    """Wait for a process to finish exiting (closing its pipes comes a moment before that)."""
    deadline = time.monotonic() + deadline_s
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still alive"
        await asyncio.sleep(0.02)


async def wait_for_port(port: int, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


def tools_by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools}


def time_config(**extra: Any) -> McpServerConfig:
    return McpServerConfig(
        name="time",
        transport="stdio",
        command=sys.executable,
        args=["-m", "mcp_server_time", "--local-timezone", "UTC"],
        **extra,
    )


def flaky_config(**extra: Any) -> McpServerConfig:
    return McpServerConfig(
        name="flaky", transport="stdio", command=sys.executable, args=[str(FLAKY)], **extra
    )


@pytest.fixture(scope="module")
def stamp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """stamp-mcp's streamable-HTTP server (aiohttp, no MCP SDK) on a free loopback port."""
    port = free_port()
    env = {
        **os.environ,
        "STAMP_HOST": "127.0.0.1",
        "STAMP_PORT": str(port),
        # Only its get_time tool writes here (and it needs NTP, so the tests never call it).
        "STAMP_DRIFT_LOG": str(tmp_path_factory.mktemp("stamp") / "drift.jsonl"),
    }
    proc = subprocess.Popen([BIN / "stamp-mcp-http"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "stamp-mcp-http exited"
                assert time.monotonic() < deadline, "stamp-mcp-http did not listen"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def stamp_config(url: str, **extra: Any) -> McpServerConfig:
    return McpServerConfig(name="stamp", transport="http", url=url, **extra)


class HttpFlaky:
    """Our flaky server over streamable HTTP, on a port that survives restarts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(FLAKY), "--http", str(self.port), stderr=subprocess.DEVNULL
        )
        await wait_for_port(self.port)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def http_flaky() -> AsyncIterator[HttpFlaky]:
    server = HttpFlaky()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


# --- configuration -------------------------------------------------------------------


def test_config_checks_transport_fields_and_names() -> None:
    assert time_config().command == sys.executable
    with pytest.raises(ValidationError, match="needs a command"):
        McpServerConfig(name="x", transport="stdio")
    with pytest.raises(ValidationError, match="needs a url"):
        McpServerConfig(name="x", transport="http")
    with pytest.raises(ValidationError, match="url do not apply to transport 'stdio'"):
        McpServerConfig(name="x", transport="stdio", command="srv", url="http://127.0.0.1:1/mcp")
    with pytest.raises(ValidationError, match="args, command do not apply"):
        McpServerConfig(name="x", transport="http", url="http://127.0.0.1:1/mcp", command="srv", args=["-v"])
    with pytest.raises(ValidationError, match="must be an http"):
        McpServerConfig(name="x", transport="http", url="file:///etc/passwd")
    for bad in ("", "has space", "a" * 33, "dots.not.ok"):
        with pytest.raises(ValidationError, match="name"):
            McpServerConfig(name=bad, transport="stdio", command="srv")
    with pytest.raises(ValidationError, match="Extra inputs"):
        McpServerConfig.model_validate({"name": "x", "transport": "stdio", "command": "srv", "bogus": 1})
    with pytest.raises(ValidationError):
        McpServerConfig(name="x", transport="stdio", command="srv", timeout_s=0)
    secret = McpServerConfig(
        name="x", transport="http", url="http://127.0.0.1:1/mcp", headers={"Authorization": "Bearer s3cret"}
    )
    assert "s3cret" not in repr(secret)
    with pytest.raises(ValueError, match="configured twice: 'time'"):
        McpManager([time_config(), time_config()])


def test_select_servers() -> None:
    configs = [time_config(), flaky_config()]
    assert select_servers(configs, None) == configs
    assert select_servers(configs, ["flaky"]) == [configs[1]]
    assert select_servers(configs, []) == []
    with pytest.raises(ValueError, match=r"unknown MCP server\(s\) 'nope'; configured: 'flaky', 'time'"):
        select_servers(configs, ["time", "nope"])


def test_render_content_summarises_non_text_parts() -> None:
    result = mt.CallToolResult(
        content=[
            mt.TextContent(text="hello"),
            mt.ImageContent(data="AAAA", mime_type="image/png"),
            mt.AudioContent(data="AAAAAA==", mime_type="audio/wav"),
            mt.ResourceLink(name="notes", uri="file:///notes.txt"),
            mt.EmbeddedResource(resource=mt.TextResourceContents(uri="mem://a", text="inline")),
            mt.EmbeddedResource(resource=mt.BlobResourceContents(uri="mem://b", blob="AAA=")),
        ]
    )
    assert render_content(result) == (
        "hello\n[image: image/png, 3 bytes]\n[audio: audio/wav, 4 bytes]\n"
        "[resource link: notes <file:///notes.txt>]\n[resource: mem://a]\ninline\n"
        "[resource: mem://b, application/octet-stream, 2 bytes]"
    )
    assert render_content(mt.CallToolResult(content=[], structured_content={"n": 1})) == '{"n": 1}'


# --- real servers ---------------------------------------------------------------------


@pytest.mark.slow
async def test_tools_are_listed_with_prefixed_names_and_server_schemas(stamp_url: str) -> None:
    configs = [time_config(idempotent_tools=["get_current_time"]), stamp_config(stamp_url)]
    async with McpManager(configs) as manager:
        assert manager.startup_errors == {}
        tools = tools_by_name(await manager.list_tools())
        assert {"mcp__time__get_current_time", "mcp__time__convert_time"} <= set(tools)
        assert {"mcp__stamp__calculate", "mcp__stamp__diff", "mcp__stamp__generate_uuid"} <= set(tools)
        assert all(name.startswith(("mcp__time__", "mcp__stamp__")) for name in tools)

        now = tools["mcp__time__get_current_time"]
        assert now.input_schema["required"] == ["timezone"]
        assert now.input_schema["properties"]["timezone"]["type"] == "string"
        assert "time" in now.description.lower()
        assert now.capabilities == frozenset({"subprocess"})
        assert now.idempotent
        assert not tools["mcp__time__convert_time"].idempotent

        calc = tools["mcp__stamp__calculate"]
        assert calc.input_schema["required"] == ["expression"]
        assert calc.capabilities == frozenset()
        assert "arithmetic" in calc.description or "math" in calc.description

        # They fit the engine's registry, and per-run selection narrows them.
        assert set(ToolRegistry(tools.values()).names()) == set(tools)
        only_stamp = await manager.list_tools(["stamp"])
        assert only_stamp
        assert all(t.name.startswith("mcp__stamp__") for t in only_stamp)
        with pytest.raises(ValueError, match="'nope'"):
            await manager.list_tools(["nope"])


@pytest.mark.slow
async def test_time_server_returns_the_real_time() -> None:
    async with McpManager([time_config()]) as manager:
        tools = tools_by_name(await manager.list_tools())
        text, is_error = await call_tool(tools["mcp__time__get_current_time"], {"timezone": "UTC"}, CTX)
        assert not is_error
        doc = json.loads(text)
        assert doc["timezone"] == "UTC"
        assert abs((datetime.fromisoformat(doc["datetime"]) - datetime.now(UTC)).total_seconds()) < 300

        text, is_error = await call_tool(
            tools["mcp__time__convert_time"],
            {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
            CTX,
        )
        assert not is_error
        assert "21:00" in text


@pytest.mark.slow
async def test_http_server_answers(stamp_url: str) -> None:
    async with McpManager([stamp_config(stamp_url)]) as manager:
        calc = tools_by_name(await manager.list_tools())["mcp__stamp__calculate"]
        text, is_error = await call_tool(calc, {"expression": "6 * 7"}, CTX)
        assert not is_error
        assert json.loads(text) == {"expression": "6 * 7", "result": 42}


@pytest.mark.slow
async def test_tool_errors_become_tool_errors(stamp_url: str) -> None:
    async with McpManager([time_config(), stamp_config(stamp_url), flaky_config()]) as manager:
        tools = tools_by_name(await manager.list_tools())
        with pytest.raises(ToolError, match="Invalid timezone"):
            await tools["mcp__time__get_current_time"].run({"timezone": "Nowhere/Atlantis"}, CTX)
        with pytest.raises(ToolError, match="cannot evaluate"):
            await tools["mcp__stamp__calculate"].run({"expression": "__import__('os')"}, CTX)
        with pytest.raises(ToolError, match="the answer is no"):
            await tools["mcp__flaky__fail"].run({"message": "the answer is no"}, CTX)
        # The engine shows them to the model as error results.
        text, is_error = await call_tool(tools["mcp__flaky__fail"], {"message": "nope"}, CTX)
        assert is_error
        assert "nope" in text
        # Arguments are checked against the server's schema before anything is sent.
        text, is_error = await call_tool(tools["mcp__time__get_current_time"], {}, CTX)
        assert is_error
        assert text.startswith("Invalid arguments")
        assert "timezone" in text


@pytest.mark.slow
async def test_non_text_content_is_summarised() -> None:
    async with McpManager([flaky_config()]) as manager:
        picture = tools_by_name(await manager.list_tools())["mcp__flaky__picture"]
        assert await picture.run({}, CTX) == f"a 1x1 pixel\n[image: image/png, {len(PNG)} bytes]"


# --- failures -------------------------------------------------------------------------


@pytest.mark.slow
async def test_unreachable_http_server_is_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="machina.engine.mcp")
    down = McpServerConfig(name="down", transport="http", url=f"http://127.0.0.1:{free_port()}/mcp")
    started = time.monotonic()
    async with McpManager([down, time_config()]) as manager:
        assert time.monotonic() - started < 15
        assert set(manager.startup_errors) == {"down"}
        assert "ConnectError" in manager.startup_errors["down"]
        tools = tools_by_name(await manager.list_tools())
        assert tools
        assert all(name.startswith("mcp__time__") for name in tools)
        _, is_error = await call_tool(tools["mcp__time__get_current_time"], {"timezone": "UTC"}, CTX)
        assert not is_error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MCP server 'down'" in m and "failed to start" in m and "ConnectError" in m for m in warnings)


@pytest.mark.slow
async def test_servers_that_cannot_start_are_left_out() -> None:
    configs = [
        McpServerConfig(name="missing", transport="stdio", command="/nonexistent/mcp-server"),
        McpServerConfig(
            name="dies",
            transport="stdio",
            command=sys.executable,
            args=["-c", "import sys; sys.exit('no config file for this server')"],
        ),
        McpServerConfig(
            name="mute",
            transport="stdio",
            command=sys.executable,
            args=["-c", "import time; time.sleep(60)"],
            startup_timeout_s=1,
        ),
        flaky_config(),
    ]
    before = children()
    started = time.monotonic()
    async with McpManager(configs) as manager:
        assert time.monotonic() - started < 15
        errors = manager.startup_errors
        assert set(errors) == {"missing", "dies", "mute"}
        assert "No such file or directory" in errors["missing"]
        assert "no config file for this server" in errors["dies"]
        assert "did not start within 1s" in errors["mute"]
        assert {t.name for t in await manager.list_tools()} >= {"mcp__flaky__echo"}
    assert {pid for pid in children() - before if alive(pid)} == set()


@pytest.mark.slow
async def test_crash_mid_call_is_an_error_and_the_server_is_restarted() -> None:
    async with McpManager([flaky_config()]) as manager:
        tools = tools_by_name(await manager.list_tools())
        first_pid = int(await tools["mcp__flaky__pid"].run({}, CTX))

        started = time.monotonic()
        with pytest.raises(ToolError) as crash:
            await tools["mcp__flaky__crash"].run({}, CTX)
        assert time.monotonic() - started < 5
        assert str(crash.value).startswith("MCP server 'flaky' is not available: ")
        assert "crashing on purpose" in str(crash.value)  # the server's last words on stderr
        await gone(first_pid)

        second_pid = int(await tools["mcp__flaky__pid"].run({}, CTX))
        assert second_pid != first_pid
        assert await tools["mcp__flaky__echo"].run({"text": "back"}, CTX) == "back"


@pytest.mark.slow
async def test_server_killed_between_calls_is_replaced_before_the_next_call() -> None:
    async with McpManager([flaky_config()]) as manager:
        pid_tool = tools_by_name(await manager.list_tools())["mcp__flaky__pid"]
        first_pid = int(await pid_tool.run({}, CTX))
        os.kill(first_pid, signal.SIGKILL)
        await gone(first_pid)
        await asyncio.sleep(0.2)  # the transport notices the end of its stdout
        assert int(await pid_tool.run({}, CTX)) != first_pid


@pytest.mark.slow
async def test_broken_http_connection_is_an_error_then_reconnects(http_flaky: HttpFlaky) -> None:
    config = McpServerConfig(name="web", transport="http", url=http_flaky.url, timeout_s=5)
    async with McpManager([config]) as manager:
        tools = tools_by_name(await manager.list_tools())
        assert tools["mcp__web__echo"].capabilities == frozenset()
        assert await tools["mcp__web__echo"].run({"text": "one"}, CTX) == "one"

        await http_flaky.kill()
        started = time.monotonic()
        with pytest.raises(ToolError, match="MCP server 'web' is not available: "):
            await tools["mcp__web__echo"].run({"text": "two"}, CTX)
        assert time.monotonic() - started < 5

        await http_flaky.start()
        assert await tools["mcp__web__echo"].run({"text": "three"}, CTX) == "three"


@pytest.mark.slow
async def test_http_server_crashing_mid_call(http_flaky: HttpFlaky) -> None:
    config = McpServerConfig(name="web", transport="http", url=http_flaky.url, timeout_s=5)
    async with McpManager([config]) as manager:
        tools = tools_by_name(await manager.list_tools())
        started = time.monotonic()
        with pytest.raises(ToolError, match="MCP server 'web' is not available: "):
            await tools["mcp__web__crash"].run({}, CTX)
        assert time.monotonic() - started < 5
        # Still down: one reconnect attempt for this call, and a clear error.
        with pytest.raises(ToolError, match=r"MCP server 'web' is not available: .*ConnectError"):
            await tools["mcp__web__echo"].run({"text": "x"}, CTX)
        await http_flaky.start()
        assert await tools["mcp__web__echo"].run({"text": "up"}, CTX) == "up"


@pytest.mark.slow
async def test_slow_tool_times_out_and_the_server_stays_usable() -> None:
    async with McpManager([flaky_config(timeout_s=1)]) as manager:
        tools = tools_by_name(await manager.list_tools())
        pid = await tools["mcp__flaky__pid"].run({}, CTX)
        started = time.monotonic()
        with pytest.raises(ToolError, match=r"MCP tool 'sleep' on server 'flaky' timed out after 1s"):
            await tools["mcp__flaky__sleep"].run({"seconds": 30}, CTX)
        assert time.monotonic() - started < 4
        assert await tools["mcp__flaky__pid"].run({}, CTX) == pid


@pytest.mark.slow
async def test_cancelled_call_leaves_the_server_usable() -> None:
    async with McpManager([flaky_config()]) as manager:
        tools = tools_by_name(await manager.list_tools())
        pid = await tools["mcp__flaky__pid"].run({}, CTX)
        call = asyncio.create_task(tools["mcp__flaky__sleep"].run({"seconds": 30}, CTX))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await tools["mcp__flaky__pid"].run({}, CTX) == pid


@pytest.mark.slow
async def test_concurrent_calls_share_one_session(stamp_url: str) -> None:
    async with McpManager([flaky_config(), stamp_config(stamp_url)]) as manager:
        tools = tools_by_name(await manager.list_tools())
        started = time.monotonic()
        slept = await asyncio.gather(*(tools["mcp__flaky__sleep"].run({"seconds": 1}, CTX) for _ in range(8)))
        assert slept == ["slept 1.0s"] * 8
        assert time.monotonic() - started < 4  # in parallel, not one after another

        sums = await asyncio.gather(
            *(tools["mcp__stamp__calculate"].run({"expression": f"{n} + {n}"}, CTX) for n in range(10))
        )
        assert [json.loads(s)["result"] for s in sums] == [2 * n for n in range(10)]


@pytest.mark.slow
async def test_close_leaves_no_child_process() -> None:
    before = children()
    manager = McpManager([time_config(), flaky_config()])
    await manager.start()
    tools = tools_by_name(await manager.list_tools())
    flaky_pid = int(await tools["mcp__flaky__pid"].run({}, CTX))
    spawned = children() - before
    assert len(spawned) == 2
    assert flaky_pid in spawned
    assert all(alive(pid) for pid in spawned)

    in_flight = asyncio.create_task(tools["mcp__flaky__sleep"].run({"seconds": 30}, CTX))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await manager.close()
    assert time.monotonic() - started < 10
    with pytest.raises(ToolError, match="MCP server 'flaky' is not available: the engine is shutting down"):
        await in_flight
    assert not any(alive(pid) for pid in spawned)
    assert not spawned & children()  # reaped, not zombies
    await manager.close()  # idempotent
    with pytest.raises(ToolError, match="shutting down"):
        await tools["mcp__flaky__echo"].run({"text": "late"}, CTX)

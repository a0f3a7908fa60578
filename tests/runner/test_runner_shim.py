"""The runner's HTTP shim against slow and idle clients, through a real runner process: the request
head and body deadlines and the connection cap (runner_service/_shim_server.py), over plain HTTP and
TLS. tests/engine/test_hostile_input.py has the slowloris tests at the default settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.certs import make_pki
from tests.processes import RunnerProcess

pytestmark = pytest.mark.slow

SECRET = "runner-secret-shim-tests-71a3"
HEAD = (
    b"POST /continue HTTP/1.1\r\nHost: runner\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + SECRET.encode() + b"\r\n"
)
BODY = b'{"runId": "no-such-run"}'
# A head that never ends, sent a byte at a time by the slow clients.
ENDLESS_HEAD = b"POST /continue HTTP/1.1\r\nHost: runner\r\nAuthorization: Bearer " + b"z" * 4000


def start_runner(tmp: Path, *args: str, **settings: float) -> RunnerProcess:
    """A runner whose ``runner_http_<name>`` settings are given as keyword arguments."""
    env = {
        "MACHINA_RUNNER_SECRET": SECRET,
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        **{f"MACHINA_RUNNER_HTTP_{name.upper()}": str(value) for name, value in settings.items()},
    }
    return RunnerProcess(tmp, *args, env=env)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    # Deadlines of a second keep the tests short; the connection cap is the default (256).
    process = start_runner(tmp_path_factory.mktemp("shim"), header_timeout_s=1, body_timeout_s=1)
    yield process
    process.close()


def address_of(runner: RunnerProcess) -> tuple[str, int]:
    host, port = runner.http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@contextlib.asynccontextmanager
async def connection(
    address: tuple[str, int], tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*address, ssl=tls)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """Read (and discard) until the server hangs up; False if it has not within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        pass  # reset: hung up too
    return True


async def dribble(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes, gap: float
) -> float:
    """Send ``data`` a byte every ``gap`` seconds until the server hangs up; the seconds that took."""
    started = time.monotonic()
    with contextlib.suppress(OSError, ssl.SSLError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gap):
                    if not await reader.read(65536):
                        break
    return time.monotonic() - started


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert status, head
    assert length, head
    return int(status.group(1)), await reader.readexactly(int(length.group(1)))


def continue_request(body: bytes = BODY, length: int | None = None) -> bytes:
    return HEAD + b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body


@pytest.mark.timeout(30)
async def test_a_connection_that_sends_nothing_is_dropped_at_the_header_deadline(
    runner: RunnerProcess,
) -> None:
    async with connection(address_of(runner)) as (reader, _):
        started = time.monotonic()
        assert await closed_by_server(reader, within=5)
        assert time.monotonic() - started > 0.5  # the deadline, not an instant refusal


@pytest.mark.timeout(30)
async def test_a_head_sent_byte_by_byte_is_dropped_at_the_header_deadline(runner: RunnerProcess) -> None:
    # Every byte arrives well within a second: the deadline is for the whole head, not per read.
    async with connection(address_of(runner)) as (reader, writer):
        took = await dribble(writer, reader, ENDLESS_HEAD, gap=0.1)
    assert took < 4, f"a 1 s header deadline let a slow head run for {took:.1f} s"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["half sent", "byte by byte"])
async def test_a_body_that_does_not_arrive_is_dropped_at_the_body_deadline(
    runner: RunnerProcess, how: str
) -> None:
    padded = BODY + b" " * 200
    async with connection(address_of(runner)) as (reader, writer):
        writer.write(continue_request(b"", length=len(padded)))
        if how == "half sent":
            writer.write(padded[: len(padded) // 2])
            await writer.drain()
            started = time.monotonic()
            assert await closed_by_server(reader, within=5)
            took = time.monotonic() - started
        else:
            took = await dribble(writer, reader, padded, gap=0.1)
    assert took < 4, f"a 1 s body deadline let a slow body run for {took:.1f} s"
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(runner.http + "/health")).status_code == 200
    # (Checked after that round trip, by which the runner has handled the disconnect.) The handler
    # saw it as a rejected request, not as a crash.
    log = runner.log.read_text()
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.timeout(30)
async def test_a_kept_alive_connection_is_closed_when_idle_or_slow_with_its_next_request(
    runner: RunnerProcess,
) -> None:
    async with connection(address_of(runner)) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: runner\r\n\r\n")
        status, body = await read_response(reader)
        assert (status, json.loads(body)["status"]) == (200, "ok")
        # The next head starts (stopping uvicorn's keep-alive timeout) and never ends.
        took = await dribble(writer, reader, ENDLESS_HEAD, gap=0.1)
    assert took < 4, f"a 1 s header deadline let the next head run for {took:.1f} s"

    async with connection(address_of(runner)) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nHost: runner\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        started = time.monotonic()
        assert await closed_by_server(reader, within=10)  # uvicorn's keep-alive timeout (5 s)
        assert time.monotonic() - started > 3


@pytest.mark.timeout(30)
async def test_slow_but_timely_requests_are_served(runner: RunnerProcess) -> None:
    async with connection(address_of(runner)) as (reader, writer):
        # Head in two writes, then the body, each gap well inside the deadlines.
        request = continue_request()
        cut = request.index(b"\r\n\r\n")
        for part in (request[:10], request[10:cut], request[cut:]):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.4)
        status, body = await read_response(reader)
        assert (status, json.loads(body)["error"]) == (404, "ERR_RUN_NOT_FOUND")
        # The same connection, kept alive, serves more requests after a pause.
        for _ in range(3):
            await asyncio.sleep(0.7)
            writer.write(b"GET /health HTTP/1.1\r\nHost: runner\r\n\r\n")
            assert (await read_response(reader))[0] == 200


async def pest(address: tuple[str, int], stop: asyncio.Event, drops: list[int]) -> None:
    """A slowloris client that connects again whenever the server drops it."""
    while not stop.is_set():
        try:
            async with connection(address) as (reader, writer):
                for byte in ENDLESS_HEAD:
                    if stop.is_set():
                        return
                    writer.write(bytes([byte]))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            if not await reader.read(1024):
                                break
        except OSError:
            pass
        drops.append(1)
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_health_and_continue_answer_during_a_sustained_slowloris(runner: RunnerProcess) -> None:
    stop, drops = asyncio.Event(), list[int]()
    pests = [asyncio.create_task(pest(address_of(runner), stop, drops)) for _ in range(300)]
    samples: list[tuple[int, int, float]] = []
    try:
        await asyncio.sleep(1.0)  # all connected: more sockets than the shim's connection cap
        async with httpx.AsyncClient(timeout=5, headers={"Connection": "close"}) as http:
            deadline = time.monotonic() + 4  # several header deadlines: pests dropped and back
            while time.monotonic() < deadline:
                started = time.monotonic()
                health = await http.get(runner.http + "/health")
                answer = await http.post(
                    runner.http + "/continue", content=BODY, headers={"Authorization": f"Bearer {SECRET}"}
                )
                samples.append((health.status_code, answer.status_code, time.monotonic() - started))
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*pests, return_exceptions=True)
    assert len(drops) >= 300, f"only {len(drops)} slow connections were dropped"
    assert samples
    assert all((health, answer) == (200, 404) for health, answer, _ in samples), samples
    assert max(took for _, _, took in samples) < 3.0, samples  # generous: the machine is shared


@pytest.mark.timeout(60)
async def test_a_flood_of_idle_sockets_makes_room_for_honest_clients(tmp_path: Path) -> None:
    # A header deadline far off: what drops the flood here is the connection cap.
    process = start_runner(tmp_path, header_timeout_s=60, max_connections=16)
    try:
        address = address_of(process)
        flood = [await asyncio.open_connection(*address) for _ in range(40)]
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                for _ in range(5):
                    assert (await http.get(process.http + "/health")).status_code == 200
            closed = await asyncio.gather(*(closed_by_server(reader, within=2) for reader, _ in flood))
        finally:
            for _, writer in flood:
                writer.close()
        # The oldest idle sockets made room; never more than the cap stayed open.
        assert sum(closed) >= 40 - 16 + 1, closed
        assert closed[0], closed
        assert not closed[-1], closed
    finally:
        process.close()


@pytest.mark.timeout(60)
async def test_tls_shim_drops_slow_clients_and_keeps_serving(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    process = start_runner(
        tmp_path,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        header_timeout_s=1,
        body_timeout_s=1,
    )
    trust = ssl.create_default_context(cafile=str(pki.ca_cert))
    try:
        address = address_of(process)
        async with connection(address, tls=trust) as (reader, writer):
            took = await dribble(writer, reader, ENDLESS_HEAD, gap=0.1)
        assert took < 4, f"a 1 s header deadline let a slow head over TLS run for {took:.1f} s"
        async with connection(address, tls=trust) as (reader, writer):
            writer.write(continue_request(b"", length=len(BODY)))
            writer.write(BODY[:5])
            await writer.drain()
            assert await closed_by_server(reader, within=5)
        https = f"https://{address[0]}:{address[1]}"
        async with httpx.AsyncClient(timeout=5, verify=trust) as http:
            assert (await http.get(https + "/health")).json()["status"] == "ok"
            answer = await http.post(
                https + "/continue", content=BODY, headers={"Authorization": f"Bearer {SECRET}"}
            )
            assert answer.status_code == 404
        # gRPC, over TLS with the same certificate, is unaffected.
        credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes())
        async with grpc.aio.secure_channel(process.grpc_target, credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        process.close()

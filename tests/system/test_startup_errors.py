"""Every operator mistake at startup is one line on stderr naming the setting, and exit status 2.

Each case starts a real ``python -m engine_service`` (or ``runner_service``) as an operator would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

_PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")
_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass
class Mistake:
    name: str
    args: Callable[[Path], list[str]]
    mentions: tuple[str, ...]
    env: Callable[[Path], dict[str, str]] = lambda tmp: {}
    unset: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A loopback port another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _start(
    module: str,
    args: list[str],
    env: dict[str, str],
    unset: tuple[str, ...],
    cwd: Path,
    launcher: Sequence[str] = (),
) -> tuple[int, str]:
    full = {k: v for k, v in os.environ.items() if k not in unset and not k.startswith("MACHINA_")}
    full.update(env)
    proc = subprocess.run(
        [*launcher, sys.executable, "-m", module, *args],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr


def _assert_one_clear_line(rc: int, stderr: str, mentions: tuple[str, ...]) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for word in mentions:
        assert word in lines[0], (word, lines[0])
    assert rc == 2, stderr


def _no_aws_credentials(tmp: Path) -> dict[str, str]:
    empty = tmp / "empty-aws-file"
    empty.write_text("")
    return {
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _a_file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("")
    return path


ENGINE_MISTAKES = [
    Mistake("unknown scheme", lambda tmp: ["--storage", "ftp://host/dir"], ("ftp", "MACHINA_STORAGE")),
    Mistake(
        "storage under a file",
        lambda tmp: ["--storage", str(_a_file(tmp) / "runs")],
        ("Not a directory", "MACHINA_STORAGE"),
    ),
    Mistake(
        "storage not creatable",
        lambda tmp: ["--storage", "/proc/machina"],
        ("/proc/machina", "MACHINA_STORAGE"),
    ),
    Mistake(
        "anthropic without its key",
        lambda tmp: ["--model", "anthropic"],
        ("ANTHROPIC_API_KEY", "anthropic"),
        unset=_PROVIDER_KEYS,
    ),
    Mistake(
        "openai without its key (environment)",
        lambda tmp: [],
        ("OPENAI_API_KEY", "MACHINA_MODEL_PROVIDER"),
        env=lambda tmp: {"MACHINA_MODEL_PROVIDER": "openai"},
        unset=_PROVIDER_KEYS,
    ),
]


@pytest.mark.parametrize("mistake", ENGINE_MISTAKES, ids=lambda m: m.name)
def test_engine_mistake_is_one_line_and_exit_2(mistake: Mistake, tmp_path: Path) -> None:
    args = ["--listen", "127.0.0.1:0", *mistake.args(tmp_path)]
    rc, stderr = _start("engine_service", args, mistake.env(tmp_path), mistake.unset, tmp_path)
    _assert_one_clear_line(rc, stderr, mistake.mentions)


def test_engine_port_in_use(busy_port: int, tmp_path: Path) -> None:
    args = [
        "--listen",
        f"127.0.0.1:{busy_port}",
        "--storage",
        str(tmp_path / "store"),
        "--log-format",
        "json",
    ]
    rc, stderr = _start("engine_service", args, {"MACHINA_LOG_LEVEL": "warning"}, (), tmp_path)
    _assert_one_clear_line(rc, stderr, (str(busy_port), "MACHINA_LISTEN"))


def test_engine_storage_not_writable() -> None:
    from tests.fs_faults import as_root_without_dac_override

    launcher = as_root_without_dac_override()  # root with its capabilities would write anyway
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir(mode=0o555)
        args = ["--listen", "127.0.0.1:0", "--storage", str(store)]
        rc, stderr = _start("engine_service", args, {}, (), Path("/"), launcher)
    _assert_one_clear_line(rc, stderr, ("Permission denied", "MACHINA_STORAGE"))


def test_engine_s3_without_credentials(moto: str, tmp_path: Path) -> None:
    env = {**_no_aws_credentials(tmp_path), "AWS_ENDPOINT_URL": moto}
    args = ["--listen", "127.0.0.1:0", "--storage", "s3://machina-no-credentials/prefix"]
    rc, stderr = _start("engine_service", args, env, _AWS, tmp_path)
    _assert_one_clear_line(rc, stderr, ("s3://machina-no-credentials/prefix", "AWS_ACCESS_KEY_ID"))


RUNNER_MISTAKES = [
    Mistake("unknown scheme", lambda tmp: ["--storage", "ftp://host/dir"], ("ftp", "MACHINA_STORAGE")),
    Mistake(
        "storage under a file",
        lambda tmp: ["--storage", str(_a_file(tmp) / "runs")],
        ("Not a directory", "MACHINA_STORAGE"),
    ),
    Mistake(
        "anthropic without its key",
        lambda tmp: [],
        ("ANTHROPIC_API_KEY",),
        env=lambda tmp: {"MACHINA_MODEL_PROVIDER": "anthropic"},
        unset=_PROVIDER_KEYS,
    ),
]


@pytest.mark.parametrize("mistake", RUNNER_MISTAKES, ids=lambda m: m.name)
def test_runner_mistake_is_one_line_and_exit_2(mistake: Mistake, tmp_path: Path) -> None:
    args = ["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *mistake.args(tmp_path)]
    env = {"MACHINA_RUNNER_SECRET": "s" * 32, **mistake.env(tmp_path)}
    rc, stderr = _start("runner_service", args, env, mistake.unset, tmp_path)
    _assert_one_clear_line(rc, stderr, mistake.mentions)


def test_runner_grpc_port_in_use(busy_port: int, tmp_path: Path) -> None:
    args = [
        "--listen",
        f"127.0.0.1:{busy_port}",
        "--http-listen",
        "127.0.0.1:0",
        "--storage",
        str(tmp_path / "s"),
    ]
    env = {"MACHINA_RUNNER_SECRET": "s" * 32, "MACHINA_LOG_LEVEL": "warning"}
    rc, stderr = _start("runner_service", args, env, (), tmp_path)
    _assert_one_clear_line(rc, stderr, (str(busy_port), "MACHINA_RUNNER_LISTEN"))


# -- storage that goes away after startup ------------------------------------------------------


async def _health(target: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def _health_becomes(target: str, status: str) -> None:
    import asyncio

    while await _health(target) != status:
        await asyncio.sleep(0.1)


async def test_health_is_not_serving_while_storage_is_unreachable(moto: str, tmp_path: Path) -> None:
    import asyncio

    from tests.processes import EngineProcess
    from tests.s3_server import FaultyProxy, new_bucket

    bucket = await new_bucket(moto)
    proxy = FaultyProxy(moto, ["ok"])
    await proxy.start()
    env = {
        "MACHINA_STORAGE": f"s3://{bucket}/machina",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_MAX_ATTEMPTS": "1",
        "MACHINA_STORAGE_PROBE_INTERVAL_S": "0.2",
        "MACHINA_RECOVERY_INTERVAL_S": "60",
    }
    try:
        engine = EngineProcess(tmp_path, env=env)
        try:
            assert await _health(engine.target) == "SERVING"
            proxy.set_pattern(["500"])
            await asyncio.wait_for(_health_becomes(engine.target, "NOT_SERVING"), 30)
            proxy.set_pattern(["ok"])
            await asyncio.wait_for(_health_becomes(engine.target, "SERVING"), 30)
        finally:
            engine.close()
    finally:
        await proxy.stop()

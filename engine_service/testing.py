"""What tests and benchmarks use from inside the engine, in one public place.

Tests and ``bench/`` build engines and servers in-process, plug in sample tools and fake
resolvers, drive the model adapters and Bash directly, and start a local S3 server. They
import those pieces from here, never from the private modules behind them. Nothing here is
needed to run the engine; the sample tools exist for tests and benchmarks only.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from engine_service.api._server import RunningServer, start_server
from engine_service.core._catalogue import builtin_tools
from engine_service.core._types import Message, Principal, ToolCall, Usage
from engine_service.net._egress import Resolver
from engine_service.storage._workdir_snapshot import WorkdirSnapshots
from engine_service.tools._bash import BashArgs, run_bash
from engine_service.tools._files import resolve_in_workdir
from engine_service.tools._registry import ASK_USER, ToolContext, tool

if TYPE_CHECKING:
    from engine_service.storage._s3 import S3Storage

__all__ = [
    "ASK_USER",
    "CREDENTIALS",
    "SAMPLE_TOOLS",
    "BashArgs",
    "DoubleArgs",
    "EchoArgs",
    "Message",
    "Principal",
    "RemoveArgs",
    "Resolver",
    "RunningServer",
    "S3Storage",
    "SleepArgs",
    "ToolCall",
    "Usage",
    "WorkdirSnapshots",
    "builtin_tools",
    "double",
    "echo",
    "explode",
    "free_port",
    "new_bucket",
    "new_database",
    "noop",
    "postgres_bin",
    "remove",
    "run_bash",
    "running_moto",
    "running_postgres",
    "sleep",
    "start_server",
    "ticket",
]


def __getattr__(name: str) -> object:
    # S3Storage needs the s3 extra (aioboto3): load it only when it is used.
    if name == "S3Storage":
        from engine_service.storage._s3 import S3Storage

        return S3Storage
    raise AttributeError(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- a local S3 server (moto's), for the S3 storage -------------------------------------

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


async def new_bucket(endpoint: str) -> str:
    """A new, empty bucket with a unique name on the S3 server at ``endpoint``."""
    import aioboto3

    name = f"b-{uuid.uuid4().hex[:16]}"
    async with aioboto3.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        await s3.create_bucket(Bucket=name)
    return name


@contextmanager
def running_moto() -> Iterator[str]:
    """Start ``moto_server`` on a free loopback port; yield its endpoint URL."""
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    proc = subprocess.Popen(  # noqa: S603 - our own argv
        [os.path.join(bin_dir, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()  # noqa: S310 - loopback
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def postgres_bin() -> str | None:
    """The directory of PostgreSQL's server programs (initdb, pg_ctl), if it is installed."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _not_root(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: as root, run them as nobody.
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]


@contextmanager
def running_postgres() -> Iterator[str]:
    """Start a throw-away PostgreSQL cluster on a free loopback port (trust authentication, no
    durability: it lives as long as the block); yield the URL of its ``postgres`` database."""
    import shutil
    import tempfile

    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    # As root the server runs as nobody, who must reach the directory: /tmp, not a private TMPDIR.
    top = tempfile.mkdtemp(prefix="machina-pg-", dir="/tmp" if os.geteuid() == 0 else None)  # noqa: S108
    os.chmod(top, 0o755)  # noqa: S103 - the server's user must reach its socket directory
    if os.geteuid() == 0:
        os.chown(top, 65534, 65534)
    data = os.path.join(top, "data")
    port = free_port()
    initdb = [
        os.path.join(bindir, "initdb"),
        "-D",
        data,
        "-U",
        "machina",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]
    subprocess.run(_not_root(initdb), check=True, capture_output=True, cwd=top)  # noqa: S603 - our own argv
    options = (
        f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    pg_ctl = [os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(top, "log"), "-w", "-t", "60"]
    subprocess.run(_not_root([*pg_ctl, "-o", options, "start"]), check=True, capture_output=True, cwd=top)  # noqa: S603
    try:
        yield f"postgresql://machina@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_not_root([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True, cwd=top)  # noqa: S603
        shutil.rmtree(top, ignore_errors=True)


async def new_database(server_url: str) -> str:
    """A new, empty database on the PostgreSQL server at ``server_url``; returns its URL."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_url.rpartition("/")[0] + "/" + name


# -- sample tools (registered by object, or by import path ``engine_service.testing:noop``) --


class DoubleArgs(BaseModel):
    x: int = Field(description="The number to double.")


@tool
async def double(args: DoubleArgs, ctx: ToolContext) -> int:
    """Double a number."""
    return args.x * 2


class EchoArgs(BaseModel):
    text: str


@tool(description="Echo the text back.")
def echo(args: EchoArgs, ctx: ToolContext) -> str:
    return args.text


@tool(input_schema={"type": "object", "properties": {}, "additionalProperties": True}, idempotent=True)
async def noop(args: dict[str, object], ctx: ToolContext) -> str:
    """Do nothing (benchmarks and loops)."""
    return "ok"


class SleepArgs(BaseModel):
    seconds: float = Field(ge=0, le=30)


@tool
async def sleep(args: SleepArgs, ctx: ToolContext) -> str:
    """Sleep for a while (cancellation tests)."""
    await asyncio.sleep(args.seconds)
    return f"slept {args.seconds}s"


@tool(input_schema={"type": "object"})
async def explode(args: dict[str, object], ctx: ToolContext) -> str:
    """Always fails."""
    raise RuntimeError("boom")


class RemoveArgs(BaseModel):
    path: str


@tool
async def remove(args: RemoveArgs, ctx: ToolContext) -> str:
    """Delete a file of the run's directory (the built-in file tools cannot)."""
    assert ctx.workdir is not None
    resolve_in_workdir(ctx.workdir, args.path).unlink()
    return f"removed {args.path}"


@tool(
    input_schema={
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"}},
        "required": ["code"],
    }
)
async def ticket(args: dict[str, object], ctx: ToolContext) -> str:
    """Open a ticket (its code is checked by a pattern)."""
    return f"opened {args['code']}"


SAMPLE_TOOLS = [double, echo, noop, sleep, explode, ticket]

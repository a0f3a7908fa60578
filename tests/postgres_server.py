"""A throw-away PostgreSQL cluster (Debian's `postgresql` package) for the control-plane tests.

initdb and the server refuse to run as root: as root they run as `nobody` in a directory
it owns. The server listens on 127.0.0.1 on a free port, with trust authentication (the
cluster lives only as long as the test session)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Yields the URL of a fresh cluster's `postgres` database (superuser `machina`)."""
    from tests.processes import free_port

    bindir = pg_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    top = Path(tempfile.mkdtemp(prefix="machina-pg-"))
    data = top / "data"
    top.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(top, 65534, 65534)
    port = free_port()
    subprocess.run(
        _as_user(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "machina",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB"
    )
    subprocess.run(
        _as_user(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(top / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://machina@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(top, ignore_errors=True)


async def new_database(server_url: str) -> str:
    """A new, empty database on the session's cluster; returns its URL."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_url.rpartition("/")[0] + "/" + name


def wait_port_closed(port: int, timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)):
                return
        time.sleep(0.05)

"""Real engine and runner processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceProcess:
    """``python -m <module> ... --port-file F``; waits until the port file appears."""

    def __init__(
        self,
        module: str,
        tmp: Path,
        *args: str,
        env: dict[str, str] | None = None,
        name: str = "",
        command: list[str] | None = None,
        cwd: Path = ROOT,
        launcher: Sequence[str] = (),  # a command the process runs under, e.g. setpriv to drop root
    ) -> None:
        """``command`` replaces ``python -m module`` (e.g. an installed console script)."""
        name = name or module
        tmp.mkdir(parents=True, exist_ok=True)
        self.port_file = tmp / f"{name}.port"
        self.port_file.unlink(missing_ok=True)
        self.log = tmp / f"{name}.log"
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [
                *launcher,
                *(command or [sys.executable, "-m", module]),
                "--port-file",
                str(self.port_file),
                *args,
            ],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 30
        while not (self.port_file.exists() and self.port_file.read_text()):
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"{module} exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{module} did not start")
            time.sleep(0.02)
        self.ports = self.port_file.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill9(self) -> None:
        """SIGKILL the process (a crash: no shutdown code runs), reap it, and close."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


class EngineProcess(ServiceProcess):
    """``port`` 0 binds any free port; a fixed one restarts an engine where its clients are."""

    def __init__(
        self,
        tmp: Path,
        *args: str,
        env: dict[str, str] | None = None,
        launcher: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        super().__init__(
            "engine_service",
            tmp,
            "--listen",
            f"127.0.0.1:{port}",
            *args,
            env=env,
            name="engine",
            launcher=launcher,
        )
        self.target = f"127.0.0.1:{self.ports}"


class RunnerProcess(ServiceProcess):
    def __init__(self, tmp: Path, *args: str, http_port: int = 0, env: dict[str, str] | None = None) -> None:
        super().__init__(
            "runner_service",
            tmp,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            f"127.0.0.1:{http_port}",
            *args,
            env=env,
            name="runner",
        )
        ports = json.loads(self.ports)
        self.grpc_target = f"127.0.0.1:{ports['grpc']}"
        self.http = f"http://127.0.0.1:{ports['http']}"

"""An engine (or a runner) as a child process on this machine, for notebooks, scripts and demos.

::

    from engine_service.local import LocalEngine
    from client_py import EngineClient

    with LocalEngine(config="demo/engine.toml") as engine, EngineClient(engine.target) as client:
        ...

The process is ``python -m engine_service`` on a free loopback port with its storage and run
directories in a temporary directory; closing it (or leaving the ``with`` block, or the
interpreter exiting) stops it gracefully and removes that directory. Its log is
``<work>/engine_service.log`` while it runs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["LocalEngine", "LocalService", "engine_or_start"]


class LocalService:
    """``python -m <module>`` serving on 127.0.0.1; ready once it has written its port file.

    Args:
        module: ``engine_service`` or ``runner_service``.
        args: extra command-line flags.
        env: extra environment variables.
        work: the directory for its port file and log; a new temporary directory (removed at
            close) when not given.
        timeout: seconds to wait for it to serve.
    """

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        work: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.module = module
        self._owns_work = work is None
        self.work = Path(tempfile.mkdtemp(prefix="machina-")) if work is None else work
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / f"{module}.log"
        port_file = self.work / f"{module}.port"
        port_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed flags
            [sys.executable, "-m", module, "--port-file", str(port_file), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        atexit.register(self.close)
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close(keep_work=True)
                raise RuntimeError(f"{module} did not start; its log is {self.log_path}")
            time.sleep(0.02)
        #: What the service wrote to its port file: a port, or JSON with several (the runner).
        self.ports = port_file.read_text()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"{type(self).__name__}({self.module}, pid={self.proc.pid}, {state})"

    def stop(self) -> int:
        """Stops the service gracefully (SIGTERM, then SIGKILL after 15 s); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def close(self, *, keep_work: bool = False) -> None:
        """Stops the service and removes its working directory if this object created it."""
        atexit.unregister(self.close)
        self.stop()
        if self._owns_work and not keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalEngine(LocalService):
    """An engine on a free loopback port, its storage in its working directory.

    Args:
        config: a TOML config file (e.g. the demo's ``demo/engine.toml``).
        args: extra flags for ``python -m engine_service``.
        env: extra environment variables (``MACHINA_*`` settings).
        work: as for ``LocalService``.
    """

    def __init__(
        self,
        *,
        config: str | os.PathLike[str] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        work: Path | None = None,
    ) -> None:
        work = Path(tempfile.mkdtemp(prefix="machina-engine-")) if work is None else work
        flags = ["--listen", "127.0.0.1:0", "--storage", str(work / "storage")]
        if config is not None:
            flags += ["--config", str(Path(config).resolve())]
        settings = {"MACHINA_WORKDIR_ROOT": str(work / "workdirs"), **(env or {})}
        super().__init__("engine_service", [*flags, *args], env=settings, work=work)
        self._owns_work = True
        #: The address to give ``EngineClient``.
        self.target = f"127.0.0.1:{self.ports}"


def _listening(target: str) -> bool:
    host, _, port = target.rpartition(":")
    with contextlib.suppress(OSError, ValueError), socket.create_connection((host, int(port)), timeout=0.5):
        return True
    return False


def engine_or_start(
    target: str = "127.0.0.1:50051", *, config: str | os.PathLike[str] | None = None
) -> tuple[str, LocalEngine | None]:
    """``target`` when something listens there, else a ``LocalEngine`` started for the caller.

    Returns the address to connect to and the engine started (``None`` when one was running);
    close that engine when done (it is also stopped when the interpreter exits).
    """
    if _listening(target):
        return target, None
    engine = LocalEngine(config=config)
    return engine.target, engine

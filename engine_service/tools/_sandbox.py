"""The OS sandbox for processes started for a run (Bash), on bubblewrap.

Every call gets fresh user, PID, IPC, UTS, cgroup and network namespaces (the network
one is kept only when the operator allows it), a root made of read-only system
directories, a fresh ``/dev``, ``/proc`` (of its own PID namespace) and ``/tmp``, and the
run's directory as the only writable path, at the same absolute path as on the host.
Nothing else of the host is mounted: not the storage root, not other runs' directories,
not config or key files (when one lies inside a mounted directory it is masked). The
environment is an allow-list, and it is all bubblewrap itself gets (the sandbox can read
its ``/proc/1/environ``); it is passed as the environment, not as arguments, because
any local user can read a process's command line.

Resource limits are rlimits set by ``prlimit`` inside the sandbox, after the user
namespace exists: the process count is then counted per call, not per host user. The
kernel never limits the process count of root, so each call also gets a pids cgroup
where the engine can create one (as root it usually can); without either, it says so
at startup.

Killing bubblewrap kills the sandbox's PID 1 (``--die-with-parent``), and with it every
process in the sandbox, grandchildren included.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("machina.engine.sandbox")

SandboxMode = Literal["bubblewrap", "none"]
# What the engine reports: sandboxed, unsandboxed on the operator's word, or no sandbox
# possible here (then the host lacks the subprocess capability).
SandboxStatus = Literal["bubblewrap", "none", "unavailable"]

_SYSTEM_DIRS = ("/usr",)
# Top-level names that are /usr symlinks on merged-/usr systems, directories elsewhere.
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc is not mounted whole: only what programs need to start, resolve names and find CAs.
_ETC_ALLOWED = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/mime.types",
    "/etc/magic",
    "/etc/inputrc",
)
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_TMP_BYTES = 64 * 1024 * 1024
# Inside the sandbox, /tmp is a fresh tmpfs of its own, never the host's.
_SANDBOX_TMP = "/tmp"  # noqa: S108
_CGROUP_PREFIX = "machina-sandbox-"


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-call rlimits (each process of the call; processes count all of the call's)."""

    cpu_s: int = 300
    address_space_mb: int = 4096
    processes: int = 256
    file_size_mb: int = 1024
    open_files: int = 1024

    def prlimit_args(self) -> list[str]:
        mb = 1024 * 1024
        return [
            f"--cpu={self.cpu_s}",
            f"--as={self.address_space_mb * mb}",
            f"--nproc={self.processes}",
            f"--fsize={self.file_size_mb * mb}",
            f"--nofile={self.open_files}",
        ]


@dataclass(frozen=True, slots=True)
class Launch:
    """How to start one sandboxed command: its argv and environment, and its pids cgroup if any.

    Call ``close()`` once the process has exited.
    """

    argv: list[str]
    env: dict[str, str]
    cgroup: Path | None = None

    def close(self) -> None:
        """Kill whatever is left in the call's cgroup and remove it."""
        if self.cgroup is None:
            return
        delay = 0.0005
        for _ in range(40):  # about 2 s in all: the sandbox's processes are already being killed
            try:
                pids = (self.cgroup / "cgroup.procs").read_text().split()
            except OSError:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                self.cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        log.warning("could not remove the sandbox cgroup %s", self.cgroup)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """The sandbox policy of one engine, read from config at startup."""

    mode: SandboxMode = "bubblewrap"
    network: bool = False
    # Allow-listed variables with their values, read once from the engine's environment.
    env: Mapping[str, str] = field(default_factory=dict)
    # Extra host paths mounted read-only (e.g. a toolchain under /opt).
    ro_paths: tuple[Path, ...] = ()
    # Host paths that must never be visible (storage root, keys, ...), masked if mounted.
    masked: tuple[Path, ...] = ()
    limits: SandboxLimits = SandboxLimits()
    bwrap: str = "bwrap"
    prlimit: str = "prlimit"

    @classmethod
    def from_config(cls, config: Any, environ: Mapping[str, str] | None = None) -> Sandbox:
        """The sandbox an EngineConfig describes (duck-typed: the runner's config adds key files)."""
        environ = os.environ if environ is None else environ
        masked = [config.storage if "://" not in config.storage else "", config.workdir_root]
        for name in ("api_keys_file", "tls_key", "tls_cert", "runner_tls_key", "runner_tls_cert"):
            masked.append(getattr(config, name, "") or "")
        return cls(
            mode=config.sandbox,
            network=config.sandbox_network,
            env={k: environ[k] for k in config.sandbox_env if k in environ},
            ro_paths=tuple(Path(p).resolve() for p in config.sandbox_ro_paths),
            masked=tuple(Path(p.removeprefix("file://")).resolve() for p in masked if p),
            limits=SandboxLimits(
                cpu_s=config.sandbox_cpu_s,
                address_space_mb=config.sandbox_memory_mb,
                processes=config.sandbox_max_processes,
                file_size_mb=config.sandbox_max_file_mb,
                open_files=config.sandbox_max_open_files,
            ),
        )

    # -- availability ----------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """Why bubblewrap cannot run here (None when it can); probed once per process and policy."""
        if self.mode == "none":
            return None
        return _probe(self.bwrap, self.prlimit, self.network)

    def status(self) -> SandboxStatus:
        if self.mode == "none":
            return "none"
        return "bubblewrap" if self.unavailable_reason() is None else "unavailable"

    # -- one call --------------------------------------------------------------------

    def base_env(self, workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": _DEFAULT_PATH, "LANG": "C.UTF-8", "TERM": "dumb", **self.env}
        env.update(HOME=str(workdir), **(extra or {}))
        if self.mode != "none":
            env["TMPDIR"] = _SANDBOX_TMP
        return env

    def launch(
        self, command: Sequence[str], workdir: Path, extra_env: Mapping[str, str] | None = None
    ) -> Launch:
        """How to run ``command`` in ``workdir`` under this policy."""
        env = self.base_env(workdir, extra_env)
        if self.mode == "none":
            return Launch(list(command), env)
        workdir = workdir.resolve()
        argv = [shutil.which(self.bwrap) or self.bwrap, *self._bwrap_args(workdir)]
        prlimit = shutil.which(self.prlimit) or self.prlimit
        argv += ["--", prlimit, *self.limits.prlimit_args(), "--", *command]
        cgroup = _pids_cgroup(self.limits.processes)
        if cgroup is not None:
            # The process joins the cgroup itself before bubblewrap starts, so nothing escapes it.
            # (Not a preexec_fn: forking a process that runs gRPC's threads aborts the child.)
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *argv]
        # bubblewrap gets the allow-listed environment and nothing else: its /proc/1/environ is
        # visible inside, and it hands its environment on to the command as it is.
        return Launch(argv, env, cgroup)

    def _bwrap_args(self, workdir: Path) -> list[str]:
        args = ["--unshare-all", "--unshare-user", "--die-with-parent", "--cap-drop", "ALL"]
        if _has_controlling_terminal():
            # A process that shares the engine's terminal could push keystrokes into it (TIOCSTI).
            # A session of its own prevents that; without a terminal there is nothing to protect,
            # and the extra session costs several ms per call.
            args.append("--new-session")
        if self.network:
            args.append("--share-net")
        args += ["--disable-userns", "--hostname", "sandbox"]
        mounted: list[Path] = []
        for d in _SYSTEM_DIRS:
            args += ["--ro-bind", d, d]
            mounted.append(Path(d))
        for link in _SYSTEM_LINKS:
            if os.path.islink(link):
                args += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link):
                args += ["--ro-bind", link, link]
                mounted.append(Path(link))
        for extra in _ETC_ALLOWED:
            args += ["--ro-bind-try", extra, extra]
            mounted.append(Path(extra))
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(_TMP_BYTES), "--tmpfs", _SANDBOX_TMP]
        # After /tmp, so that an operator's path under /tmp is not hidden by the fresh tmpfs.
        for extra in map(str, self.ro_paths):
            args += ["--ro-bind-try", extra, extra]
            mounted.append(Path(extra))
        hidden = [p for p in self.masked if any(_within(p, m) for m in mounted)]
        for path in hidden:
            if path.is_dir():
                args += ["--size", "4096", "--tmpfs", str(path)]
            elif path.exists():
                args += ["--ro-bind", "/dev/null", str(path)]
        args += ["--bind", str(workdir), str(workdir)]
        for path in hidden:
            if path.is_dir():
                args += ["--remount-ro", str(path)]
        args += ["--chdir", str(workdir)]
        return args


def _has_controlling_terminal() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY))
    except OSError:
        return False
    return True


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _pids_cgroup(limit: int) -> Path | None:
    """A fresh cgroup capped at ``limit`` processes, where this process may create one.

    The kernel never applies RLIMIT_NPROC to root, so an engine running as root relies on
    this (cgroup v1 ``pids`` or a delegated cgroup v2 with the pids controller); elsewhere
    it is a second fence behind the rlimit. None when no writable pids hierarchy exists.
    """
    # The creator's pid in the name lets a later process remove what a crashed one left.
    name = f"{_CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    for base in _pids_bases():
        path = base / name
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / "pids.max").write_text(str(limit))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            continue
        return path
    return None


def sweep_stale_cgroups() -> int:
    """Kill and remove the call cgroups of engines that no longer exist; how many were removed.

    A crashed engine skips ``Launch.close``. Its sandboxes normally die with it (bubblewrap's
    parent), but one started in the instant before the crash can miss that signal and live on
    with no timeout: its cgroup still holds it, so this ends it.
    """
    removed = 0
    for base in _pids_bases():
        for path in base.glob(f"{_CGROUP_PREFIX}*"):
            owner = path.name.removeprefix(_CGROUP_PREFIX).partition("-")[0]
            if not owner.isdigit() or _alive(int(owner)):
                continue
            Launch([], {}, path).close()
            removed += not path.exists()
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _can_make_pids_cgroup() -> bool:
    path = _pids_cgroup(1)
    if path is None:
        return False
    with contextlib.suppress(OSError):
        path.rmdir()
    return True


def _pids_bases() -> list[Path]:
    bases = [Path("/sys/fs/cgroup/pids")]
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return bases
    for line in own:
        if line.startswith("0::"):  # cgroup v2: a child of our own cgroup, if it is delegated to us
            rel = line[3:].lstrip("/")
            bases += [Path("/sys/fs/cgroup/unified") / rel, Path("/sys/fs/cgroup") / rel]
    return [b for b in bases if (b / "cgroup.procs").exists()]


@functools.cache  # a fact about this host and binary: probing costs a process start, so once is enough
def _probe(bwrap: str, prlimit: str, network: bool) -> str | None:
    if shutil.which(bwrap) is None:
        return f"{bwrap} is not installed"
    if shutil.which(prlimit) is None:
        return f"{prlimit} is not installed"
    with tempfile.TemporaryDirectory(prefix="machina-sandbox-probe-") as tmp:
        launch = Sandbox(network=network, bwrap=bwrap, prlimit=prlimit).launch(["true"], Path(tmp))
        try:
            done = subprocess.run(  # noqa: S603 - our own argv, no shell
                launch.argv, env=launch.env, capture_output=True, timeout=10, stdin=subprocess.DEVNULL,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{bwrap} cannot start: {exc}"
        finally:
            launch.close()
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"{bwrap} cannot create a sandbox here: {detail[-1] if detail else f'exit {done.returncode}'}"
    return None


def describe(sandbox: Sandbox, capable: bool) -> tuple[int, str]:
    """The startup log line about the sandbox: (level, message)."""
    if not capable:
        return logging.INFO, "subprocess capability off: Bash and stdio MCP servers are capability stubs"
    if sandbox.mode == "none":
        return logging.WARNING, (
            "sandbox = none: Bash runs UNSANDBOXED, as the engine's user with the engine's view of "
            "the machine (MACHINA_SANDBOX=bubblewrap confines it)"
        )
    reason = sandbox.unavailable_reason()
    if reason is not None:
        return logging.WARNING, (
            f"no sandbox: {reason}; Bash and stdio MCP servers are capability stubs here (handed to a "
            "runner that has a sandbox); MACHINA_SANDBOX=none runs them unsandboxed instead"
        )
    net = "network allowed" if sandbox.network else "no network"
    allowed = ", ".join(sorted(sandbox.env)) or "none"
    if os.geteuid() == 0 and not _can_make_pids_cgroup():
        return logging.WARNING, (
            f"sandbox: bubblewrap ({net}, environment allow-list: {allowed}); the engine runs as root "
            "and cannot create a pids cgroup, so nothing limits a sandbox's process count (the kernel "
            "exempts root from RLIMIT_NPROC): run it as an unprivileged user"
        )
    return logging.INFO, f"sandbox: bubblewrap ({net}, environment allow-list: {allowed})"

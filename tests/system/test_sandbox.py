"""Hostile Bash steps against real engine and runner processes: the sandbox holds.

Each step is what a prompt-injected model would try: read the engine's or the runner's
environment and command line through /proc, connect to their ports (or any loopback
port), read the storage root, the API keys file or another run's directory, write
outside its own directory, fork-bomb, fill the disk, outlive its timeout. The same
corpus runs where the engine runs Bash itself and where it hands Bash to the runner.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_py import AsyncEngineClient, InvalidRequestError, Run, ToolCallCompleted, ToolCallStarted
from tests.conftest import ServerFactory, refresh_until, turn
from tests.engine.tools.test_builtin_tools import processes_with, run_calls
from tests.processes import EngineProcess, RunnerProcess
from tests.secrets_util import BEARER, MARKER, assert_no_secret

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]

RUNNER_SECRET = "runner-SECRET-sandbox-3b9d"
API_KEY = "sk-SECRET-apikey-71aa0"
ENV_SECRET = "env-SECRET-engine-c0de"
SECRETS = (RUNNER_SECRET, API_KEY, ENV_SECRET, BEARER)
LIMITS = {"MACHINA_SANDBOX_MAX_PROCESSES": "64", "MACHINA_SANDBOX_MAX_FILE_MB": "8"}


@dataclass
class Stack:
    tmp: Path
    engine: EngineProcess
    runner: RunnerProcess
    keys_file: Path
    listener: socket.socket
    bash_in: str

    @property
    def storage(self) -> Path:
        return self.tmp / "storage"

    @property
    def workdirs(self) -> Path:
        return self.tmp / "workdirs"

    def ports(self) -> list[int]:
        runner = [int(t.rpartition(":")[2]) for t in (self.runner.grpc_target, self.runner.http)]
        return [int(self.engine.ports), *runner, self.listener.getsockname()[1]]


@pytest.fixture(scope="module", params=["engine", "runner"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real engine and runner with secrets in their environment, config and keys file; Bash runs
    in the engine itself (``engine``) or is handed to the runner (``runner``)."""
    tmp = tmp_path_factory.mktemp(f"sandbox-{request.param}")
    keys = tmp / "keys.toml"
    keys.write_text(f'"{API_KEY}" = "default"\n')
    config = tmp / "machina.toml"
    config.write_text(
        "[api]\n[[api.services]]\nname = 'svc'\nbase_url = 'http://127.0.0.1:9'\n"
        "auth = { type = 'bearer', token_ref = 'SVC_TOKEN' }\n"
        f"[api.env]\nSVC_TOKEN = '{BEARER}'\n"
    )
    env = {
        "MACHINA_STORAGE": str(tmp / "storage"),
        "MACHINA_WORKDIR_ROOT": str(tmp / "workdirs"),
        "MACHINA_RUNNER_SECRET": RUNNER_SECRET,
        "MACHINA_API_KEYS_FILE": str(keys),
        "MACHINA_TOOLS_CUSTOM": "tests.tools:double",
        "MACHINA_TOOLS_PERMISSIONS": "double=ask",
        "MACHINA_TEST_SECRET": ENV_SECRET,
        "SVC_TOKEN": BEARER,
        **LIMITS,
    }
    runner = RunnerProcess(tmp, "--config", str(config), env=env)
    engine_env = {**env, "MACHINA_RUNNER_URL": f"{runner.http}/continue"}
    if request.param == "runner":
        engine_env["MACHINA_CAPABILITIES_SUBPROCESS"] = "false"
    engine = EngineProcess(tmp, "--config", str(config), env=engine_env)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield Stack(tmp, engine, runner, keys, listener, request.param)
    listener.close()
    engine.close()
    runner.close()


async def run_bash(
    stack: Stack, *commands: str, timeout_s: float = 20
) -> tuple[Run, list[ToolCallCompleted]]:
    """One async run whose first turn calls Bash with each command; (run, completed calls)."""
    calls = [("Bash", {"command": c, "timeout_s": timeout_s}) for c in commands]
    async with AsyncEngineClient(stack.engine.target, api_key=API_KEY) as client:
        handle = await client.create("hostile", model="scripted", script=[turn("", *calls), turn("done")])
        run = await handle.wait(timeout=60)
        run = await refresh_until(handle, "DONE", "FAILED")
        events = [e async for e in handle.events(follow=False)]
    # Calls run concurrently: put the results back in call order.
    order = [e.call.call_id for e in events if isinstance(e, ToolCallStarted)]
    done = sorted(
        (e for e in events if isinstance(e, ToolCallCompleted)), key=lambda e: order.index(e.call_id)
    )
    return run, done


def proc_view(command: str) -> str:
    return f"{command} 2>&1; echo END"


async def test_hostile_steps_are_confined(stack: Stack) -> None:
    # Another run of the same workspace, with a private file, and one paused on an approval.
    other, _ = await run_bash(stack, "echo private-data-4e1 > mine.txt")
    assert other.state == "DONE"
    other_dir = stack.workdirs / "default" / other.run_id
    assert (other_dir / "mine.txt").exists()
    async with AsyncEngineClient(stack.engine.target, api_key=API_KEY) as client:
        pending = await client.execute(
            "approve me", model="scripted", script=[turn("", ("double", {"x": 2})), turn("ok")]
        ).result()
    assert pending.state == "PAUSED"

    tag = uuid.uuid4().hex[:8]
    # An abstract unix socket: no file to mount, reachable from any process in the network namespace.
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0machina-test-{tag}")
    abstract.listen()
    pids = f"{stack.engine.proc.pid} {stack.runner.proc.pid} {os.getpid()}"
    ports = " ".join(map(str, stack.ports()))
    outside = [
        f"/usr/evil-{tag}",
        f"/etc/evil-{tag}",
        f"{stack.storage}/evil-{tag}",
        f"{stack.workdirs}/evil-{tag}",
        f"{other_dir}/evil-{tag}",
        f"/tmp/evil-{tag}",
        f"{stack.tmp}/evil-{tag}",
    ]
    corpus = {
        "environ": "cat /proc/[0-9]*/environ | tr '\\0' '\\n'; cat /proc/$PPID/environ; env",
        "cmdline": "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
        "ports": f"for p in {ports}; do for h in 127.0.0.1 localhost; do "
        f"(exec 3<>/dev/tcp/$h/$p) 2>/dev/null && echo OPEN-$h-$p; done; done",
        "storage": f"ls -laR {stack.storage}; cat {stack.storage}/workspaces/default/runs/*/state.json",
        "keys": f"cat {stack.keys_file}; cat {stack.tmp}/machina.toml; ls -la {stack.tmp}",
        "other run": f"cat {other_dir}/mine.txt; ls -1 {stack.workdirs}/default | sed s/^/LS:/",
        "writes": f"for f in {' '.join(outside)}; do echo x > $f; done; touch ../evil-{tag}",
        "host": "cat /proc/1/cmdline; hostname; ls /sys /home /root /var /opt",
        "nesting": "unshare -r id && echo NESTED; bwrap --bind / / id && echo NESTED",
        "signals": f"for p in {pids}; do kill -0 $p && echo SIGNALLED-$p; kill -9 $p; done",
        "unix": f'python3 -c "import socket; s = socket.socket(socket.AF_UNIX); '
        f"s.connect('\\0machina-test-{tag}'); print('OPEN-UNIX')\"",
    }
    try:
        run, done = await run_bash(stack, *(proc_view(c) for c in corpus.values()))
    finally:
        abstract.close()
    assert run.state == "DONE"
    by_check = dict(zip(corpus, (c.output for c in done), strict=True))
    for check, output in by_check.items():
        assert "END" in output, (check, output)
        for secret in SECRETS:
            assert secret not in output, (check, output)
        assert MARKER not in output, (check, output)
    assert "OPEN-" not in by_check["ports"]
    assert "NESTED" not in by_check["nesting"]
    assert "SIGNALLED" not in by_check["signals"]
    assert "OPEN-UNIX" not in by_check["unix"]
    assert "engine_service" not in by_check["cmdline"]
    assert "runner_service" not in by_check["cmdline"]
    assert "private-data-4e1" not in by_check["other run"]
    assert "No such file or directory" in by_check["other run"]
    assert f"LS:{other.run_id}" not in by_check["other run"]
    assert f"LS:{run.run_id}" in by_check["other run"]
    assert '"state"' not in by_check["storage"]
    assert other.run_id not in by_check["storage"]
    assert not [f for f in outside if Path(f).exists()]
    assert not (stack.workdirs / "default" / f"evil-{tag}").exists()
    assert (stack.workdirs / "default" / run.run_id).is_dir()
    # The paused run was not approved behind the caller's back.
    async with AsyncEngineClient(stack.engine.target, api_key=API_KEY) as client:
        still = await (await client.attach(pending.run_id)).refresh()
    assert still.state == "PAUSED"


async def test_an_ordinary_step_works_and_read_sees_its_file(stack: Stack) -> None:
    script = [
        turn("", ("Bash", {"command": "echo hi > f && cat f"})),
        turn("", ("Read", {"path": "f"})),
        turn("done"),
    ]
    async with AsyncEngineClient(stack.engine.target, api_key=API_KEY) as client:
        handle = await client.create("ordinary", model="scripted", script=script)
        await handle.wait(timeout=60)
        run = await refresh_until(handle, "DONE", "FAILED")
        done = [e async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]
    assert run.state == "DONE"
    bash, read = done
    assert not bash.is_error
    assert "hi" in bash.output
    assert not read.is_error
    assert "hi" in read.output


def sandbox_health(target: str) -> str:
    """The sandbox status a server reports on its health service (``machina.sandbox.<status>``)."""
    channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    found = []
    try:
        for status in ("bubblewrap", "none", "unavailable", "off"):
            request = health_pb2.HealthCheckRequest(service=f"machina.sandbox.{status}")
            try:
                if stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    found.append(status)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
    finally:
        channel.close()
    assert len(found) == 1, found
    return found[0]


class HealthProbe:
    """Checks the engine's health every 100 ms in a thread, each with a 1 s deadline."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                reply = self._stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                self.answers += 1
            except Exception as exc:  # any failure is what the test reports
                self.failures.append(repr(exc))

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._channel.close()


async def test_fork_bomb_and_disk_filler_are_contained(stack: Stack) -> None:
    bomb = "bomb() { bomb | bomb & }; bomb; sleep 3; echo still-here"
    with HealthProbe(stack.engine.target) as probe, HealthProbe(stack.runner.grpc_target) as runner_probe:
        run, (forked, filled) = await run_bash(stack, bomb, "yes > f", timeout_s=10)
    assert run.state == "DONE"
    assert "process limit (64)" in forked.output
    assert filled.is_error
    assert "size limit (8 MB)" in filled.output
    assert (stack.workdirs / "default" / run.run_id / "f").stat().st_size <= 8 * 1024 * 1024
    assert probe.answers > 0
    assert probe.failures == []
    assert runner_probe.answers > 0
    assert runner_probe.failures == []


async def test_the_timeout_kills_the_whole_tree(stack: Stack) -> None:
    marker = f"300.{uuid.uuid4().int % 10**9}"
    command = f"(setsid sleep {marker} &); (sleep {marker}; echo) & nohup sleep {marker} & sleep {marker}"
    run, (result,) = await run_bash(stack, command, timeout_s=1)
    assert run.state == "DONE"
    assert result.is_error
    assert "timed out" in result.output
    for _ in range(50):
        if not processes_with(marker):
            break
        await asyncio.sleep(0.1)
    assert processes_with(marker) == []


async def test_health_and_shim_report_the_sandbox(stack: Stack) -> None:
    engine_mode = "bubblewrap" if stack.bash_in == "engine" else "off"
    assert sandbox_health(stack.engine.target) == engine_mode
    assert sandbox_health(stack.runner.grpc_target) == "bubblewrap"
    async with httpx.AsyncClient() as http:
        health = (await http.get(f"{stack.runner.http}/health")).json()
    assert health == {"status": "ok", "sandbox": "bubblewrap"}


def test_no_secret_reached_storage_or_logs(stack: Stack) -> None:
    """Runs last in the module (pytest keeps file order): the hostile runs left no secret behind."""
    blobs = [p.read_bytes() for p in stack.storage.rglob("*") if p.is_file()]
    blobs += [p.read_bytes() for p in stack.workdirs.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20]
    blobs += [stack.engine.log.read_bytes(), stack.runner.log.read_bytes()]
    assert blobs
    assert_no_secret(blobs, "storage, run directories and logs")
    for blob in blobs:
        for secret in (RUNNER_SECRET, API_KEY, ENV_SECRET):
            assert secret.encode() not in blob


@pytest.mark.parametrize("mode", ["bubblewrap", "none"])
async def test_without_bubblewrap_bash_is_a_stub_unless_the_operator_opts_out(
    tmp_path: Path, mode: str
) -> None:
    """No bubblewrap (here: not on PATH): no subprocess capability, so Bash is a capability stub;
    ``sandbox = none`` runs it unsandboxed instead, with a warning and the mode on the health service."""
    empty = tmp_path / "bin"
    empty.mkdir()
    engine = EngineProcess(
        tmp_path, "--storage", str(tmp_path / "storage"), env={"PATH": str(empty), "MACHINA_SANDBOX": mode}
    )
    try:
        reported = sandbox_health(engine.target)
        async with AsyncEngineClient(engine.target) as client:
            script = [turn("", ("Bash", {"command": "echo ran-it"})), turn("done")]
            run = await client.execute("x", model="scripted", script=script).result()
    finally:
        engine.stop()
        engine.close()
    log = engine.log.read_text()
    assert run.state == "DONE"
    if mode == "bubblewrap":
        assert reported == "unavailable"
        assert run.meta.capabilities_missing == ["Bash"]
        assert "no sandbox: bwrap is not installed" in log
    else:
        assert reported == "none"
        assert run.meta.capabilities_missing == []
        assert "UNSANDBOXED" in log


# -- what the operator can change (a real server in this process, driven through the client) --


async def test_operator_settings_widen_only_what_they_name(servers: ServerFactory, tmp_path: Path) -> None:
    """``sandbox_env`` passes the named variables only; ``sandbox_ro_paths`` mounts a directory
    read-only, with the key and storage files inside it still masked; ``sandbox_network`` opens
    the host's network, loopback included."""
    tools_dir = tmp_path / "opt-tools"
    tools_dir.mkdir()
    (tools_dir / "tool.sh").write_text("echo tool-ran\n")
    keys = tools_dir / "keys.toml"
    keys.write_text(f'"{API_KEY}" = "default"\n')
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    os.environ["MACHINA_TEST_ALLOWED"] = "allowed-value"
    os.environ["MACHINA_TEST_SECRET"] = ENV_SECRET
    try:
        checks = (
            ("Bash", {"command": "echo $MACHINA_TEST_ALLOWED; env"}),
            ("Bash", {"command": f"bash {tools_dir}/tool.sh; cat {keys}; touch {tools_dir}/x; echo END"}),
            ("Bash", {"command": f"(exec 3<>/dev/tcp/127.0.0.1/{port}) && echo OPEN; echo END"}),
            ("Bash", {"command": f"ls -R {servers.root}; touch {servers.root}/x {servers.root}/workdirs/x"}),
        )
        closed = await servers.start(config={"api_keys_file": str(keys)})
        wide = await servers.start(
            config={
                "api_keys_file": str(keys),
                "sandbox_env": ["MACHINA_TEST_ALLOWED"],
                # The storage root (with every run directory) inside an operator path: still masked.
                "sandbox_ro_paths": [str(tools_dir), str(servers.root)],
                "sandbox_network": True,
            }
        )
        results = {}
        for name, srv in (("closed", closed), ("wide", wide)):
            async with AsyncEngineClient(f"127.0.0.1:{srv.port}", api_key=API_KEY) as client:
                results[name] = [c.output for c in await run_calls(client, *checks)]
    finally:
        del os.environ["MACHINA_TEST_ALLOWED"], os.environ["MACHINA_TEST_SECRET"]
        listener.close()
    (env_closed, files_closed, net_closed, _), (env_wide, files_wide, net_wide, storage_wide) = (
        results["closed"],
        results["wide"],
    )
    assert "allowed-value" not in env_closed
    assert "allowed-value" in env_wide
    assert ENV_SECRET not in env_closed + env_wide
    assert "tool-ran" not in files_closed
    assert "tool-ran" in files_wide
    assert API_KEY not in files_closed + files_wide
    assert not (tools_dir / "x").exists()
    assert "OPEN" not in net_closed
    assert "OPEN" in net_wide
    assert "workspaces" not in storage_wide
    assert "state.json" not in storage_wide
    assert not (servers.root / "x").exists()
    assert not (servers.root / "workdirs" / "x").exists()


async def test_a_run_can_only_narrow_the_network(servers: ServerFactory) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    probe = ("Bash", {"command": f"(exec 3<>/dev/tcp/127.0.0.1/{listener.getsockname()[1]}) && echo OPEN"})
    try:
        allowed = await servers.start(config={"sandbox_network": True})
        closed = await servers.start()
        async with AsyncEngineClient(f"127.0.0.1:{allowed.port}") as client:
            (default,) = await run_calls(client, probe)
            (narrowed,) = await run_calls(client, probe, sandbox_network=False)
        async with AsyncEngineClient(f"127.0.0.1:{closed.port}") as client:
            with pytest.raises(InvalidRequestError) as refused:
                await client.create("x", model="scripted", script=[turn("done")], sandbox_network=True)
    finally:
        listener.close()
    assert "OPEN" in default.output
    assert "OPEN" not in narrowed.output
    assert refused.value.code == "ERR_INVALID_REQUEST"
    assert refused.value.metadata["field"] == "sandbox_network"


async def test_a_crash_leaves_no_cgroup_behind_the_next_start(tmp_path: Path) -> None:
    """A call's pids cgroup is removed when the call ends; a crash skips that, so the next engine
    on the host ends what is left in the cgroups of engines that are gone, and removes them."""
    from engine_service.tools._sandbox import _pids_bases

    bases = _pids_bases()
    if os.geteuid() != 0 or not bases:
        pytest.skip("no writable pids cgroup hierarchy here")
    env = {"MACHINA_STORAGE": str(tmp_path / "storage"), "MACHINA_WORKDIR_ROOT": str(tmp_path / "w")}
    engine = EngineProcess(tmp_path, env=env)
    pid = engine.proc.pid

    def cgroups_of(owner: int) -> list[Path]:
        return [p for b in bases for p in b.glob(f"machina-sandbox-{owner}-*")]

    try:
        async with AsyncEngineClient(engine.target) as client:
            marker = f"300.{uuid.uuid4().int % 10**9}"
            script = [turn("", ("Bash", {"command": f"sleep {marker}; sleep {marker}"})), turn("done")]
            await client.create("x", model="scripted", script=script)
            for _ in range(400):
                if cgroups_of(pid):
                    break
                await asyncio.sleep(0.05)
        assert cgroups_of(pid)
    finally:
        engine.kill9()
    restarted = EngineProcess(tmp_path, env=env)
    try:
        for _ in range(100):
            if not cgroups_of(pid) and not processes_with(marker):
                break
            await asyncio.sleep(0.05)
        assert cgroups_of(pid) == []
        assert processes_with(marker) == []
    finally:
        restarted.close()

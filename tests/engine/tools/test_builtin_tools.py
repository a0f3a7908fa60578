"""Built-in tools through full runs (scripted model, real server, public client), adversarially."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from client_py import AsyncEngineClient, ResultNotFoundError, ToolCallCompleted
from engine_service.api._server import RunningServer
from tests.conftest import ServerFactory, turn


def workdir(server: RunningServer, run_id: str) -> Path:
    path = Path(server.engine.config.workdir_root) / "default" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


async def run_calls(
    client: AsyncEngineClient, *calls: tuple[str, dict[str, Any]], run_id: str | None = None, **options: Any
) -> list[ToolCallCompleted]:
    """One turn making ``calls``, then a final answer; the completed tool calls in call order."""
    script = [turn("", *calls), turn("done")]
    execution = client.execute("use tools", model="scripted", script=script, run_id=run_id, **options)
    events = [e async for e in execution]
    assert execution.run is not None
    assert execution.run.state == "DONE", execution.run
    completed = [e for e in events if isinstance(e, ToolCallCompleted)]
    # Calls run concurrently and complete in any order; scripted call ids end in their call index.
    return sorted(completed, key=lambda e: int(e.call_id.rsplit("_", 1)[1]))


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


# -- files ------------------------------------------------------------------------------


async def test_write_read_edit_round_trip(client: AsyncEngineClient, server: RunningServer) -> None:
    run_id = new_run_id()
    results = await run_calls(
        client,
        ("Write", {"path": "notes/a.txt", "content": "alpha\nbeta\ngamma\n"}),
        run_id=run_id,
    )
    assert not results[0].is_error
    assert (workdir(server, run_id) / "notes" / "a.txt").read_text() == "alpha\nbeta\ngamma\n"
    # A second run cannot see the first run's directory; use the same run id's directory via a new run.
    run2 = new_run_id()
    (workdir(server, run2) / "a.txt").write_text("one two two three\n")
    read, edit_missing, edit_ambiguous, edit_ok, edit_all, _ = await run_calls(
        client,
        ("Read", {"path": "a.txt"}),
        ("Edit", {"path": "a.txt", "old_string": "four", "new_string": "4"}),
        ("Edit", {"path": "a.txt", "old_string": "two", "new_string": "2"}),
        ("Edit", {"path": "a.txt", "old_string": "one", "new_string": "1"}),
        ("Edit", {"path": "a.txt", "old_string": "two", "new_string": "2", "replace_all": True}),
        ("Read", {"path": "a.txt"}),
        run_id=run2,
    )
    assert "one two two three" in read.output
    assert edit_missing.is_error
    assert "not found" in edit_missing.output
    assert edit_ambiguous.is_error
    assert "occurs 2 times" in edit_ambiguous.output
    assert not edit_ok.is_error
    assert not edit_all.is_error
    # Tools run concurrently, so only the final file content is checked.
    assert (workdir(server, run2) / "a.txt").read_text() in (
        "1 2 2 three\n",
        "one 2 2 three\n",
        "1 two two three\n",
    )


@pytest.mark.parametrize(
    "path",
    [
        "../outside.txt",
        "../../../../etc/passwd",
        "/etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
        "a/../../x",
        "sub/../../escape",
    ],
)
async def test_paths_cannot_escape_the_workdir(client: AsyncEngineClient, path: str) -> None:
    read, write = await run_calls(client, ("Read", {"path": path}), ("Write", {"path": path, "content": "x"}))
    assert read.is_error
    assert write.is_error
    assert "outside the run's workspace" in read.output or "not a regular file" in read.output


async def test_symlink_escape_and_special_files(client: AsyncEngineClient, server: RunningServer) -> None:
    run_id = new_run_id()
    root = workdir(server, run_id)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "zero").symlink_to("/dev/zero")
    (root / "up").symlink_to(root.parent)
    os.mkfifo(root / "fifo")
    (root / "inside.txt").write_text("ok")
    (root / "alias").symlink_to(root / "inside.txt")
    results = await run_calls(
        client,
        ("Read", {"path": "passwd"}),
        ("Read", {"path": "zero"}),
        ("Read", {"path": "up/other"}),
        ("Read", {"path": "fifo"}),
        ("Write", {"path": "passwd", "content": "pwned"}),
        ("Read", {"path": "alias"}),
        ("Glob", {"pattern": "**/*"}),
        run_id=run_id,
    )
    passwd, zero, up, fifo, write, alias, listing = results
    assert all(r.is_error for r in (passwd, zero, up, fifo, write))
    assert "not a regular file" in fifo.output
    assert not alias.is_error
    assert "ok" in alias.output
    assert "passwd" not in listing.output.split()
    assert "inside.txt" in listing.output
    assert Path("/etc/passwd").read_text() != "pwned"


async def test_a_symlink_loop_cannot_hide_an_escape(client: AsyncEngineClient, server: RunningServer) -> None:
    # realpath stops resolving at a loop and keeps the rest of the path as written, so
    # "loop/../etc/passwd" came back as {root}/etc/passwd while {root}/etc points at /etc
    # (found by fuzz/fuzz_workdir_paths.py).
    run_id = new_run_id()
    root = workdir(server, run_id)
    (root / "loop").symlink_to(root / "loop")
    (root / "etc").symlink_to("/etc")
    (root / "sneaky").symlink_to("loop/../etc/passwd")  # the same trick inside a listed file
    *refused, grep, listing = await run_calls(
        client,
        ("Read", {"path": "loop/..//etc/passwd/sub/.."}),
        ("Read", {"path": "loop/../etc/passwd"}),
        ("Read", {"path": "sneaky"}),
        ("Write", {"path": "loop/../etc/machina-pwned", "content": "pwned"}),
        ("Grep", {"pattern": "root"}),
        ("Glob", {"pattern": "*"}),
        run_id=run_id,
    )
    assert all(r.is_error for r in refused), refused
    assert all("root:" not in r.output for r in (*refused, grep))
    assert "sneaky" not in listing.output.split()  # listed files resolve inside the directory
    assert not Path("/etc/machina-pwned").exists()


async def test_binary_huge_and_non_utf8_files(client: AsyncEngineClient, server: RunningServer) -> None:
    run_id = new_run_id()
    root = workdir(server, run_id)
    (root / "bin.dat").write_bytes(b"\x00\x01\x02" * 1000)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with open(root / "big.txt", "w") as fh:
        fh.write(("x" * 99 + "\n") * 40_000)  # 4 MB
    binary, latin, big, edit_binary = await run_calls(
        client,
        ("Read", {"path": "bin.dat"}),
        ("Read", {"path": "latin1.txt"}),
        ("Read", {"path": "big.txt", "limit": 5}),
        ("Edit", {"path": "bin.dat", "old_string": "a", "new_string": "b"}),
        run_id=run_id,
    )
    assert "binary file" in binary.output
    assert "caf\ufffd au lait" in latin.output
    assert "only the first" in big.output
    assert "pass offset" in big.output
    assert edit_binary.is_error


async def test_glob_and_grep(client: AsyncEngineClient, server: RunningServer) -> None:
    run_id = new_run_id()
    root = workdir(server, run_id)
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "main.py").write_text("import os\nprint('hello')\n")
    (root / "src" / "pkg" / "util.py").write_text("def helper():\n    return 'Hello'\n")
    (root / "README.md").write_text("hello world\n")
    (root / "blob.bin").write_bytes(b"hello\x00world")
    py, md, bad_pattern, grep, grep_ci, grep_bad = await run_calls(
        client,
        ("Glob", {"pattern": "**/*.py"}),
        ("Glob", {"pattern": "*.md"}),
        ("Glob", {"pattern": "../*"}),
        ("Grep", {"pattern": "hello"}),
        ("Grep", {"pattern": "hello", "ignore_case": True, "glob": "*.py"}),
        ("Grep", {"pattern": "("}),
        run_id=run_id,
    )
    assert py.output.split() == ["src/main.py", "src/pkg/util.py"]
    assert md.output.split() == ["README.md"]
    assert bad_pattern.is_error
    assert sorted(grep.output.splitlines()) == ["README.md:1:hello world", "src/main.py:2:print('hello')"]
    assert "src/pkg/util.py:2:    return 'Hello'" in grep_ci.output
    assert grep_bad.is_error


# -- Bash -------------------------------------------------------------------------------


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(pid))
    return found


async def test_bash_runs_in_the_workdir_and_reports_exit_codes(
    client: AsyncEngineClient, server: RunningServer
) -> None:
    run_id = new_run_id()
    os.environ["MACHINA_TEST_SECRET"] = "must-not-leak-into-bash"
    try:
        ok, failing, env = await run_calls(
            client,
            ("Bash", {"command": "pwd; echo hi > f.txt; cat f.txt"}),
            ("Bash", {"command": "echo oops >&2; exit 3"}),
            ("Bash", {"command": "env"}),
            run_id=run_id,
        )
    finally:
        del os.environ["MACHINA_TEST_SECRET"]
    assert not ok.is_error
    assert str(workdir(server, run_id)) in ok.output
    assert "exit code: 0" in ok.output
    assert failing.is_error
    assert "exit code: 3" in failing.output
    assert "oops" in failing.output
    assert "must-not-leak-into-bash" not in env.output


async def test_bash_timeout_kills_the_whole_process_group(client: AsyncEngineClient) -> None:
    marker = f"300.{uuid.uuid4().int % 10**9}"
    (result,) = await run_calls(
        client, ("Bash", {"command": f"(sleep {marker}; echo done) & sleep {marker}", "timeout_s": 0.5})
    )
    assert result.is_error
    assert "timed out" in result.output
    await asyncio.sleep(0.2)
    assert processes_with(marker) == []


async def test_cancelling_a_run_kills_its_bash_command(client: AsyncEngineClient) -> None:
    # A unique sleep length marks the processes (bash may exec sleep, dropping its own command line).
    marker = f"300.{uuid.uuid4().int % 10**9}"
    script = [turn("", ("Bash", {"command": f"sleep {marker}; sleep {marker}"})), turn("never")]
    handle = await client.create("x", model="scripted", script=script)
    for _ in range(100):
        if processes_with(marker):
            break
        await asyncio.sleep(0.05)
    assert processes_with(marker)
    await handle.cancel()
    run = await handle.wait(timeout=10)
    assert run.state == "CANCELLED"
    await asyncio.sleep(0.2)
    assert processes_with(marker) == []


async def test_bash_huge_and_non_utf8_output(client: AsyncEngineClient) -> None:
    huge, binary = await run_calls(
        client,
        ("Bash", {"command": "yes 0123456789 | head -c 5000000"}),
        ("Bash", {"command": "printf 'ok\\377\\376\\n'"}),
    )
    assert "stdout truncated: 5000000 bytes" in huge.output
    assert len(huge.output) < 40_000
    assert "ok\ufffd\ufffd" in binary.output


async def test_without_subprocess_bash_is_a_stub_and_sync_runs_degrade(servers: ServerFactory) -> None:
    srv = await servers.start(config={"capabilities_subprocess": False})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as c:
        script = [turn("", ("Bash", {"command": "echo hi"})), turn("I could not run it.")]
        run = await c.execute("x", model="scripted", script=script).result()
    assert run.state == "DONE"
    assert run.meta.capabilities_missing == ["Bash"]
    docs = await srv.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
    error = json.loads(docs[2]["text"])
    assert docs[2]["is_error"] is True
    assert (error["error"], error["tool"], error["missing"]) == ("capability_missing", "Bash", ["subprocess"])


# -- large results -----------------------------------------------------------------------


async def test_large_results_are_truncated_for_the_model_and_kept_in_full(servers: ServerFactory) -> None:
    srv = await servers.start(config={"tools": {"max_result_chars": 2000}})
    run_id = new_run_id()
    content = "".join(f"line {i:05d}\n" for i in range(3000))
    (workdir(srv, run_id) / "big.txt").write_text(content)
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as c:
        script = [
            turn("", ("Read", {"path": "big.txt", "limit": 20000})),
            turn("", ("FetchData", {"ref": "call_1_1", "offset": 2000, "length": 100})),
            turn("", ("FetchData", {"ref": "nope"})),
            turn("done"),
        ]
        execution = c.execute("read", model="scripted", script=script, run_id=run_id)
        completed = [e async for e in execution if isinstance(e, ToolCallCompleted)]
        read, fetched, missing = completed
        assert read.size_bytes > 2000
        assert "truncated: showing 2000" in read.output
        assert "FetchData" in read.output
        assert len(fetched.output) < 300
        assert missing.is_error
        handle = await c.attach(run_id)
        full = await handle.tool_result("call_1_1")
        assert "line 02999" in full
        assert len(full) == read.size_bytes
        with pytest.raises(ResultNotFoundError):
            await handle.tool_result("call_9_9")


# -- WebFetch ------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/hello":
            self._send(200, "text/plain", b"hello from loopback")
        elif self.path == "/big":
            self._send(200, "text/plain", b"y" * 3_000_000)
        elif self.path == "/image":
            self._send(200, "image/png", b"\x89PNG....")
        elif self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", "http://10.255.255.1/secret")
            self.end_headers()
        elif self.path == "/to-hello":
            self.send_response(302)
            self.send_header("Location", "/hello")
            self.end_headers()
        else:
            self._send(404, "text/plain", b"nope")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def web() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


async def test_webfetch_refuses_loopback_and_private_targets_by_default(
    client: AsyncEngineClient, web: str
) -> None:
    results = await run_calls(
        client,
        ("WebFetch", {"url": f"{web}/hello"}),
        ("WebFetch", {"url": "http://localhost:1/x"}),
        ("WebFetch", {"url": "http://10.1.2.3/x"}),
        ("WebFetch", {"url": "http://169.254.169.254/latest/meta-data"}),
        ("WebFetch", {"url": "http://[::1]:1/"}),
        ("WebFetch", {"url": "file:///etc/passwd"}),
        ("WebFetch", {"url": "http://user:pw@example.com/"}),
    )
    assert all(r.is_error for r in results)
    assert "non-public address" in results[0].output
    assert "only http and https" in results[5].output


async def test_webfetch_with_an_allowed_host(servers: ServerFactory, web: str) -> None:
    srv = await servers.start(config={"tools": {"webfetch_allow_hosts": ["127.0.0.1"]}})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as c:
        hello, big, image, redirect_ok, redirect_private = await run_calls(
            c,
            ("WebFetch", {"url": f"{web}/hello"}),
            ("WebFetch", {"url": f"{web}/big"}),
            ("WebFetch", {"url": f"{web}/image"}),
            ("WebFetch", {"url": f"{web}/to-hello"}),
            ("WebFetch", {"url": f"{web}/to-private"}),
        )
    assert "hello from loopback" in hello.output
    assert "status: 200" in hello.output
    assert "[truncated at 2097152 bytes]" in big.output or big.size_bytes <= 2_200_000
    assert "binary content not shown" in image.output
    assert "hello from loopback" in redirect_ok.output
    assert redirect_private.is_error
    assert "non-public address" in redirect_private.output


def test_no_test_here_contacts_a_private_address() -> None:
    # The refusal happens before any connection; this guards the fixture above.
    assert socket.gethostbyname("localhost").startswith("127.")

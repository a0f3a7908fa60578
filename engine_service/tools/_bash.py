"""Bash: a shell command in the run's workspace directory, bounded in time and output.

The command runs in the engine's sandbox (`_sandbox.Sandbox`: bubblewrap, unless the
operator said ``sandbox = "none"``) and in its own process group, so a timeout or a
cancelled run kills everything it started, not just the shell. Its environment is an
allow-list: the engine's own variables (API keys among them) never reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal

from pydantic import BaseModel, Field

from engine_service.tools._registry import Tool, ToolContext, ToolError, tool_from_callable
from engine_service.tools._sandbox import Launch, Sandbox

OUTPUT_CAP_BYTES = 30_000
DEFAULT_TIMEOUT_S = 120.0
MAX_TIMEOUT_S = 600.0


class BashArgs(BaseModel):
    command: str = Field(min_length=1, max_length=100_000, description="The bash command line to run.")
    timeout_s: float = Field(
        DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S, description="Kill the command after this many seconds."
    )


class _Capture:
    """Reads a pipe to the end (so the child never blocks on a full pipe), keeping the first bytes."""

    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        self.kept = bytearray()
        self.total = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.total += len(chunk)
            if len(self.kept) < self.cap:
                self.kept += chunk[: self.cap - len(self.kept)]

    def show(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.total > len(self.kept):
            text += f"\n[{self.name} truncated: {self.total} bytes, first {len(self.kept)} shown]"
        return text


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _limit_note(returncode: int | None, stderr: bytes, sandbox: Sandbox) -> str:
    """Which sandbox limit a failure hit, said plainly (the shell's own message is terse)."""
    if sandbox.mode == "none" or returncode is None:
        return ""
    limits = sandbox.limits
    signo = returncode - 128 if returncode > 128 else -returncode
    if signo == signal.SIGXFSZ or b"File size limit exceeded" in stderr:
        return f"\n[sandbox limit: a file reached the size limit ({limits.file_size_mb} MB)]"
    if signo == signal.SIGXCPU:
        return f"\n[sandbox limit: a process used its CPU time ({limits.cpu_s} s)]"
    if b"fork: " in stderr and b"Resource temporarily unavailable" in stderr:
        return f"\n[sandbox limit: the command reached the process limit ({limits.processes})]"
    return ""


async def run_bash(args: BashArgs, ctx: ToolContext, sandbox: Sandbox) -> str:
    """Run a bash command in the run's workspace directory. Returns the exit code, stdout and stderr."""
    if ctx.workdir is None:
        raise ToolError("this host gives the run no workspace directory")
    if sandbox.network and ctx.sandbox_network is False:
        sandbox = dataclasses.replace(sandbox, network=False)  # the run narrowed it
    launch = sandbox.launch(["bash", "-c", args.command], ctx.workdir, {"MACHINA_RUN_ID": ctx.run_id})
    try:
        return await _run(args, ctx, sandbox, launch)
    finally:
        await asyncio.shield(asyncio.to_thread(launch.close))


async def _run(args: BashArgs, ctx: ToolContext, sandbox: Sandbox, launch: Launch) -> str:
    proc = await asyncio.create_subprocess_exec(
        *launch.argv,
        cwd=ctx.workdir, env=launch.env,
        # Its own process group either way; unsandboxed also its own session (bubblewrap starts
        # one for the command itself, and a session around bubblewrap costs several ms per call).
        start_new_session=sandbox.mode == "none", process_group=None if sandbox.mode == "none" else 0,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = _Capture("stdout", OUTPUT_CAP_BYTES), _Capture("stderr", OUTPUT_CAP_BYTES)
    readers = asyncio.gather(out.drain(proc.stdout), err.drain(proc.stderr))
    timed_out = False
    try:
        async with asyncio.timeout(args.timeout_s):
            await proc.wait()
    except TimeoutError:
        timed_out = True
    finally:
        # On timeout, cancellation or a normal exit: nothing the command started outlives it.
        # In the sandbox, killing bubblewrap kills the sandbox's PID 1 and so every process in it.
        _kill_group(proc.pid)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
        # A process that left the group may still hold the pipes open: stop reading soon.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.shield(readers)
        readers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await readers
    report = f"exit code: {proc.returncode}\n--- stdout ---\n{out.show()}\n--- stderr ---\n{err.show()}"
    if not timed_out:
        report += _limit_note(proc.returncode, bytes(err.kept), sandbox)
    if timed_out:
        raise ToolError(f"command timed out after {args.timeout_s:g}s and was killed\n{report}")
    if proc.returncode != 0:
        raise ToolError(report)
    return report


def bash_tool(sandbox: Sandbox) -> Tool:
    """The Bash tool, running its commands under ``sandbox``."""

    async def bash(args: BashArgs, ctx: ToolContext) -> str:
        """Run a bash command in the run's workspace directory. Returns the exit code, stdout and stderr."""
        return await run_bash(args, ctx, sandbox)

    return tool_from_callable(bash, name="Bash", capabilities=("subprocess",))

"""The sandbox's cost per Bash call: the Bash tool running ``true`` with and without bubblewrap.

Both sides go through the same tool code (`run_bash`: spawn, pipes, output capture, the
kill of the process group) and alternate call by call in one process, so the difference
is what bubblewrap and its rlimits/cgroup add.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._rows import summarize
from engine_service import ToolContext
from engine_service.testing import BashArgs, run_bash
from engine_service.tools import Sandbox


async def bash_latency_ms(calls: int) -> dict[str, Any]:
    """p50/p95 of one Bash call (``true``) unsandboxed and sandboxed, interleaved; None if no bubblewrap."""
    sandboxed, bare = Sandbox(), Sandbox(mode="none")
    reason = sandboxed.unavailable_reason()
    if reason is not None:
        return {"unavailable": reason}
    args = BashArgs(command="true")
    times: dict[str, list[float]] = {"none": [], "bubblewrap": []}
    with tempfile.TemporaryDirectory(prefix="machina-bench-sandbox-") as tmp:
        ctx = ToolContext(run_id="bench", workspace_id="bench", call_id="c", workdir=Path(tmp))
        for i in range(calls + 5):
            for name, sandbox in (("none", bare), ("bubblewrap", sandboxed)):
                start = time.perf_counter()
                await run_bash(args, ctx, sandbox)
                if i >= 5:  # warm-up
                    times[name].append((time.perf_counter() - start) * 1000)
    none, bwrap = summarize(times["none"]), summarize(times["bubblewrap"])
    return {"none": none, "bubblewrap": bwrap, "added_p50_ms": bwrap["median"] - none["median"],
            "added_p95_ms": bwrap["p95"] - none["p95"]}  # fmt: skip


if __name__ == "__main__":
    print(asyncio.run(bash_latency_ms(100)))

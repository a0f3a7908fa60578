"""What one ResumeRun costs the engine, independent of the machine's load: the storage operations
and the Python function calls of ``Engine.resume_run`` approving a run the same engine paused
(an engine and its gRPC server in this process; only the engine's part is counted).

Run as ``python -c "$(cat bench/_resume_probe.py)" N`` from a checkout (its ``engine_service`` is
the one imported), so an older checkout is measured by the same code; prints one JSON line.
Uses only what an engine from before this probe offers too (LocalStorage, the scripted model,
the public ``engine_service`` and ``engine_service.testing``).
"""

import asyncio
import collections
import cProfile
import json
import pstats
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from engine_service import Engine, EngineConfig, LocalStorage, ToolRegistry
from engine_service.testing import SAMPLE_TOOLS, start_server
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2

OPERATIONS = (
    "create_run", "read_spec", "read_state", "write_state", "write_segment", "read_segments",
    "drop_uncommitted", "repair_end", "put_blob", "get_blob", "acquire_lease", "release_lease", "commit",
)  # fmt: skip


async def measure(n: int) -> dict[str, Any]:
    ops: collections.Counter[str] = collections.Counter()
    counting = False
    inside = 0  # an operation made of others (commit) counts once
    profile = cProfile.Profile()
    resume_run = Engine.resume_run

    async def measured_resume(*args: Any, **kwargs: Any) -> Any:
        nonlocal counting
        counting = True
        profile.enable()
        try:
            return await resume_run(*args, **kwargs)
        finally:
            profile.disable()
            counting = False

    with tempfile.TemporaryDirectory() as tmp:
        storage = LocalStorage(tmp)
        for name in OPERATIONS:
            method = getattr(storage, name, None)
            if method is None:
                continue

            def counted(method: Any = method, name: str = name) -> Any:
                async def call(*args: Any, **kwargs: Any) -> Any:
                    nonlocal inside
                    if counting and not inside:
                        ops[name] += 1
                    inside += 1
                    try:
                        return await method(*args, **kwargs)
                    finally:
                        inside -= 1

                return call

            setattr(storage, name, counted())
        config = EngineConfig.model_validate(
            {"workdir_root": str(Path(tmp) / "work"), "tools": {"permissions": {"double": "ask"}}}
        )
        engine = Engine(config, storage, tools=ToolRegistry(SAMPLE_TOOLS))
        server = await start_server(engine, "127.0.0.1:0")
        turn = svc.ScriptedTurn()
        turn.tool_calls.add(name="double").arguments.update({"x": 1})
        spec = svc.RunSpec(
            task="approve",
            model=svc.ModelSpec(provider="scripted", script=[turn, svc.ScriptedTurn(text="ok")]),
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = svc_grpc.EngineServiceStub(channel)
                for index in range(n + 2):  # two warm-ups
                    run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
                    run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=30_000))).run
                    decision = svc.Decision(
                        interrupt_id=run.pause.interrupts[0].interrupt_id, approve=svc.Approve()
                    )
                    Engine.resume_run = measured_resume if index >= 2 else resume_run  # type: ignore[method-assign]
                    await stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, decisions=[decision]))
                    Engine.resume_run = resume_run  # type: ignore[method-assign]
                    run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=30_000))).run
                    assert run.state == run_pb2.RUN_STATE_DONE, run
        finally:
            Engine.resume_run = resume_run  # type: ignore[method-assign]
            await server.stop(0.5)
    calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    return {
        "storage_ops": {k: v / n for k, v in sorted(ops.items())},
        "storage_ops_total": sum(ops.values()) / n,
        "python_calls": calls / n,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 50))))

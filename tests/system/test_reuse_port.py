"""``--reuse-port``: two engine processes over one storage directory serve one port; the kernel
spreads connections over them, and either answers for any run. Without it the port is taken."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from client_py import AsyncEngineClient
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2
from tests.processes import EngineProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"MACHINA_STORAGE": str(tmp_path / "storage"), "MACHINA_WORKDIR_ROOT": str(tmp_path / "work")}


async def test_two_engines_share_one_port_with_reuse_port(tmp_path: Path) -> None:
    port = free_port()
    env = {**_env(tmp_path), "MACHINA_LOG_FORMAT": "json"}
    a = EngineProcess(tmp_path / "a", "--reuse-port", env=env, port=port)
    try:
        b = EngineProcess(tmp_path / "b", env={**env, "MACHINA_REUSE_PORT": "true"}, port=port)
        try:
            assert a.ports == b.ports == str(port)
            target = f"127.0.0.1:{port}"

            async def one(index: int) -> str:
                # A connection of its own each (no subchannel shared between channels): the
                # kernel picks the process per connection.
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with grpc.aio.insecure_channel(target, options=options) as channel:
                    stub = svc_grpc.EngineServiceStub(channel)
                    spec = svc.RunSpec(
                        task=f"task {index}",
                        model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="ok")]),
                    )
                    run = (await stub.CreateRun(svc.CreateRunRequest(spec=spec))).run
                    run = (await stub.WaitRun(svc.WaitRunRequest(run_id=run.run_id, timeout_ms=30_000))).run
                    assert run.state == run_pb2.RUN_STATE_DONE, run
                    return str(run.run_id)

            run_ids = await asyncio.gather(*(one(i) for i in range(24)))
            await asyncio.sleep(0.2)  # the logs are flushed
            served_a = sum(run_id in a.log.read_text() for run_id in run_ids)
            served_b = sum(run_id in b.log.read_text() for run_id in run_ids)
            # Both served some (all on one by chance: 2**-23).
            assert served_a, (served_a, served_b)
            assert served_b, (served_a, served_b)

            # Either process answers for any run: the storage is shared.
            b.stop()
            async with AsyncEngineClient(target) as client:
                for run_id in run_ids:
                    assert (await client.get_run(run_id)).state == "DONE"
        finally:
            b.close()
    finally:
        a.close()


def test_without_reuse_port_a_second_engine_cannot_take_the_port(tmp_path: Path) -> None:
    port = free_port()
    a = EngineProcess(tmp_path / "a", "--reuse-port", env=_env(tmp_path), port=port)
    try:
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            EngineProcess(tmp_path / "b", env=_env(tmp_path), port=port)
    finally:
        a.close()

"""Resuming a run this process paused: it goes on from what the pause left in memory (its spec,
transcript and tools are not read back), and only while storage still holds exactly that pause.
A replica that moved the run since, a retry, a refused decision: each answers as from storage.
Two servers over one storage directory stand for two replicas."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from client_py import (
    ApprovalDecided,
    Approve,
    AsyncEngineClient,
    AsyncRunHandle,
    MachinaError,
    Run,
    RunEvent,
    ToolCallCompleted,
)
from engine_service.testing import RunningServer
from tests.conftest import ServerFactory, turn

pytestmark = pytest.mark.timeout(30)

ASK = {"tools": {"permissions": {"double": "ask"}}}


def count_storage_calls(server: RunningServer) -> collections.Counter[str]:
    """Count the calls of each storage operation the server's engine makes from now on."""
    storage = server.engine.storage
    calls: collections.Counter[str] = collections.Counter()
    for name in ("read_spec", "read_state", "read_segments", "acquire_lease", "write_segment", "commit"):
        method = getattr(storage, name)

        def counted(method: Callable[..., Awaitable[Any]] = method, name: str = name) -> Any:
            async def call(*args: Any, **kwargs: Any) -> Any:
                calls[name] += 1
                return await method(*args, **kwargs)

            return call

        setattr(storage, name, counted())
    return calls


async def history(handle: AsyncRunHandle) -> list[RunEvent]:
    return [e async for e in handle.events(follow=False)]


def outputs(events: list[RunEvent]) -> list[str]:
    return [e.output for e in events if isinstance(e, ToolCallCompleted)]


def decided(events: list[RunEvent]) -> list[str]:
    return [e.interrupt_id for e in events if isinstance(e, ApprovalDecided)]


async def paused(client: AsyncEngineClient, *script: dict[str, Any]) -> Run:
    handle = await client.create("double", model="scripted", script=list(script))
    run = await handle.wait(timeout=10)
    assert run.state == "PAUSED", run
    return run


async def test_a_run_paused_here_resumes_without_reading_its_spec_or_transcript_back(
    servers: ServerFactory,
) -> None:
    server = await servers.start(config=ASK)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        run = await paused(
            client, turn("", ("double", {"x": 21})), turn("", ("double", {"x": 1})), turn("42")
        )
        calls = count_storage_calls(server)
        handle = await client.attach(run.run_id)
        await handle.approve(run.interrupts[0].interrupt_id)
        assert (calls["read_spec"], calls["read_segments"]) == (0, 0), calls
        # Paused again here (the second call) and resumed again: still from memory.
        run = await handle.wait(timeout=10)
        assert run.state == "PAUSED"
        assert run.interrupts[0].arguments == {"x": 1}
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=10)
        assert run.state == "DONE"
        assert run.data == "42"
        assert (calls["read_spec"], calls["read_segments"]) == (0, 0), calls
        assert outputs(await history(handle)) == ["42", "2"]


async def test_decisions_a_replica_recorded_since_the_pause_here_are_kept(servers: ServerFactory) -> None:
    """Paused here with two approvals pending; a replica approves one; approving the other here
    must build on the replica's decision, not on what this process kept from its pause."""
    here = await servers.start(config=ASK)
    there = await servers.start(config=ASK)
    async with (
        AsyncEngineClient(f"127.0.0.1:{here.port}") as client,
        AsyncEngineClient(f"127.0.0.1:{there.port}") as replica,
    ):
        run = await paused(client, turn("", ("double", {"x": 1}), ("double", {"x": 2})), turn("both"))
        first, second = (i.interrupt_id for i in run.interrupts)
        left = await (await replica.attach(run.run_id)).approve(first)
        assert left.state == "PAUSED"
        assert [i.interrupt_id for i in left.interrupts] == [second]
        handle = await client.attach(run.run_id)
        await handle.approve(second)
        run = await handle.wait(timeout=10)
        assert run.state == "DONE", run
        events = await history(handle)
        assert decided(events) == [first, second]
        assert outputs(events) == ["2", "4"]


async def test_a_run_a_replica_resumed_and_paused_again_is_resumed_from_storage(
    servers: ServerFactory,
) -> None:
    here = await servers.start(config=ASK)
    there = await servers.start(config=ASK)
    async with (
        AsyncEngineClient(f"127.0.0.1:{here.port}") as client,
        AsyncEngineClient(f"127.0.0.1:{there.port}") as replica,
    ):
        run = await paused(client, turn("", ("double", {"x": 1})), turn("", ("double", {"x": 5})), turn("ok"))
        moved = await replica.attach(run.run_id)
        await moved.approve(run.interrupts[0].interrupt_id)
        again = await moved.wait(timeout=10)
        assert again.state == "PAUSED"
        assert again.interrupts[0].arguments == {"x": 5}
        # What this process kept is the first pause: a decision for it is refused as already
        # decided, and the pending one is applied to the run as the replica left it.
        handle = await client.attach(run.run_id)
        with pytest.raises(MachinaError) as refused:
            await handle.approve(run.interrupts[0].interrupt_id)
        assert refused.value.code == "ERR_INTERRUPT_NOT_FOUND"
        await handle.approve(again.interrupts[0].interrupt_id)
        done = await handle.wait(timeout=10)
        assert done.state == "DONE"
        assert done.meta.turns == 3
        assert outputs(await history(handle)) == ["2", "10"]


async def test_a_retried_resume_and_a_refused_decision_answer_as_before(servers: ServerFactory) -> None:
    server = await servers.start(config=ASK)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        run = await paused(client, turn("", ("double", {"x": 3})), turn("", ("double", {"x": 4})), turn("ok"))
        handle = await client.attach(run.run_id)
        with pytest.raises(MachinaError) as refused:
            await handle.approve("int_nope")
        assert refused.value.code == "ERR_INTERRUPT_NOT_FOUND"
        # Refused, nothing changed: the run is still resumed from memory.
        decision = Approve(run.interrupts[0].interrupt_id)
        first = await handle.resume(decision, request_id="req-1")
        again = await handle.resume(decision, request_id="req-1")
        assert first.state == "RUNNING"
        assert again.run_id == run.run_id
        run = await handle.wait(timeout=10)
        assert run.state == "PAUSED"
        assert run.interrupts[0].arguments == {"x": 4}
        # The same request id once more, now that the run paused again: answered, not applied.
        retried = await handle.resume(decision, request_id="req-1")
        assert retried.state == "PAUSED"
        assert retried.interrupts[0].arguments == {"x": 4}
        assert len(decided(await history(handle))) == 1


async def test_another_workspace_cannot_resume_a_run_paused_here(servers: ServerFactory) -> None:
    from engine_service import Principal

    keys = {"key-a": Principal("team-a", "alice"), "key-b": Principal("team-b", "bob")}
    server = await servers.start(config=ASK, api_keys=keys)
    target = f"127.0.0.1:{server.port}"
    async with (
        AsyncEngineClient(target, api_key="key-a") as alice,
        AsyncEngineClient(target, api_key="key-b") as bob,
    ):
        run = await paused(alice, turn("", ("double", {"x": 3})), turn("ok"))
        with pytest.raises(MachinaError) as refused:
            await bob.attach(run.run_id)
        assert refused.value.code == "ERR_RUN_NOT_FOUND"
        handle = await alice.attach(run.run_id)
        await handle.approve(run.interrupts[0].interrupt_id)
        assert (await handle.wait(timeout=10)).state == "DONE"


async def test_a_run_id_a_replica_deleted_and_used_again_is_resumed_as_the_new_run(
    servers: ServerFactory,
) -> None:
    """Same id, same place in its history, same interrupt id: only the state document as a whole
    tells the new run from the one paused here."""
    here = await servers.start(config=ASK)
    there = await servers.start(config=ASK)
    async with (
        AsyncEngineClient(f"127.0.0.1:{here.port}") as client,
        AsyncEngineClient(f"127.0.0.1:{there.port}") as replica,
    ):
        old = await client.create("old", model="scripted", run_id="reused",
                                  script=[turn("", ("double", {"x": 1})), turn("old")])  # fmt: skip
        first = await old.wait(timeout=10)
        await (await replica.attach("reused")).cancel()
        await replica.delete_run("reused")
        new = await replica.create("new", model="scripted", run_id="reused",
                                   script=[turn("", ("double", {"x": 7})), turn("new")])  # fmt: skip
        second = await new.wait(timeout=10)
        assert second.state == "PAUSED"
        assert second.last_seq == first.last_seq
        assert second.interrupts[0].interrupt_id == first.interrupts[0].interrupt_id
        handle = await client.attach("reused")
        await handle.approve(second.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=10)
        assert run.state == "DONE"
        assert run.data == "new"
        assert run.task == "new"
        assert outputs(await history(handle)) == ["14"]


async def test_resumes_go_on_in_the_run_s_newest_segments(servers: ServerFactory) -> None:
    """Taken back with nobody having written since, a run's event log and transcript go on in the
    segments its pause left newest instead of starting a file each per resume."""
    server = await servers.start(config=ASK)
    async with AsyncEngineClient(f"127.0.0.1:{server.port}") as client:
        script = [turn("", ("double", {"x": x})) for x in range(1, 5)] + [turn("ok")]
        run = await paused(client, *script)
        handle = await client.attach(run.run_id)
        while run.state == "PAUSED":
            await handle.approve(run.interrupts[0].interrupt_id)
            run = await handle.wait(timeout=10)
        assert run.state == "DONE"
        assert outputs(await history(handle)) == ["2", "4", "6", "8"]
    run_dir = servers.root / "workspaces" / "default" / "runs" / run.run_id
    assert len(list((run_dir / "events").iterdir())) == 1
    assert len(list((run_dir / "transcript").iterdir())) == 1

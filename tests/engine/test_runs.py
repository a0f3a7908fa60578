"""Run behaviour through a real EngineService and the public async client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from client_py import (
    ApprovalDecided,
    ApprovalRequested,
    AsyncEngineClient,
    ConcurrentUpdateError,
    InterruptNotFoundError,
    RunNotFoundError,
    RunNotPausedError,
    ToolCallCompleted,
    ToolCallStarted,
)
from tests.conftest import ServerFactory, refresh_until, turn

DOUBLE_THEN_ANSWER = [turn("Let me double it.", ("double", {"x": 21})), turn("The answer is 42.")]


async def test_streaming_run_yields_events_then_the_final_run(client: AsyncEngineClient) -> None:
    execution = client.execute("Say hi", model="scripted", script=[turn("Hello there, human.")])
    kinds = [event.kind async for event in execution]
    assert kinds[0] == "run_started"
    assert kinds.count("text_delta") >= 3
    assert kinds[-1] == "run_finished"
    run = execution.run
    assert run is not None
    assert run.state == "DONE"
    assert run.data == "Hello there, human."
    assert run.meta.turns == 1


async def test_stream_seqs_are_gap_free(client: AsyncEngineClient) -> None:
    script = [
        turn("one two", ("echo", {"text": "a"})),
        turn("three four", ("echo", {"text": "b"})),
        turn("end"),
    ]
    events = [e async for e in client.execute("go", model="scripted", script=script)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_async_run_with_wait_and_follow_watch(client: AsyncEngineClient) -> None:
    handle = await client.create(
        "double", model="scripted", script=[turn("Echo first.", ("echo", {"text": "x"})), turn("Done.")]
    )
    watched = [e async for e in handle.events(after_seq=0, follow=True)]
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    assert watched[-1].kind == "run_finished"
    assert [e.seq for e in watched] == list(range(1, run.last_seq + 1))
    completed = [e for e in watched if isinstance(e, ToolCallCompleted)]
    assert completed[0].output == "x"


async def test_approve(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    assert run.state == "PAUSED"
    assert run.pause_reason == "AWAITING_APPROVAL"
    (interrupt,) = run.interrupts
    assert interrupt.tool_name == "double"
    assert interrupt.arguments == {"x": 21}
    assert "double" in interrupt.description
    await handle.approve(interrupt.interrupt_id)
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    events = [e async for e in handle.events(follow=False)]
    decided = next(e for e in events if isinstance(e, ApprovalDecided))
    assert decided.decision == "approve"
    assert decided.decided_by == "local-user"
    assert len(decided.arguments_sha256) == 64
    result = next(e for e in events if isinstance(e, ToolCallCompleted))
    assert result.output == "42"


async def test_approve_with_edits_runs_the_edited_arguments(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    await handle.approve(run.interrupts[0].interrupt_id, edits={"x": 50})
    await handle.wait(timeout=10)
    events = [e async for e in handle.events()]
    assert next(e for e in events if isinstance(e, ToolCallCompleted)).output == "100"
    assert next(e for e in events if isinstance(e, ApprovalDecided)).decision == "approve_with_edits"


async def test_reject_shows_the_reason_to_the_model(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    await handle.reject(run.interrupts[0].interrupt_id, reason="not today")
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    events = [e async for e in handle.events()]
    assert not any(isinstance(e, ToolCallStarted) for e in events)
    decided = next(e for e in events if isinstance(e, ApprovalDecided))
    assert (decided.decision, decided.reason) == ("reject", "not today")


async def test_respond_makes_the_output_the_tool_result(client: AsyncEngineClient, server: Any) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    await handle.respond(run.interrupts[0].interrupt_id, {"value": 7})
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    # The model saw the caller's output as the tool result (transcript entry 3).
    docs = await server.engine.storage.read_segments("default", run.run_id, "transcript", 0, 10)
    assert docs[2]["text"] == '{"value": 7}'
    assert docs[2]["is_error"] is False


async def test_several_interrupts_answered_one_by_one(client: AsyncEngineClient) -> None:
    script = [turn("Two at once.", ("double", {"x": 1}), ("double", {"x": 2})), turn("Both done.")]
    handle = await client.create("two", model="scripted", script=script)
    run = await handle.wait(timeout=10)
    assert [i.arguments for i in run.interrupts] == [{"x": 1}, {"x": 2}]
    first, second = run.interrupts
    run = await handle.approve(second.interrupt_id)
    assert run.state == "PAUSED"
    assert [i.interrupt_id for i in run.interrupts] == [first.interrupt_id]
    await handle.reject(first.interrupt_id, reason="no")
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    events = [e async for e in handle.events()]
    completed = [e for e in events if isinstance(e, ToolCallCompleted)]
    # Both calls are on the record: the rejected one with what the model was told.
    assert [(c.outcome, c.output) for c in completed] == [
        ("rejected", "The user rejected this call. Reason: no"),
        ("ran", "4"),
    ]


async def test_several_interrupts_answered_together(client: AsyncEngineClient) -> None:
    script = [turn("Two.", ("double", {"x": 1}), ("double", {"x": 2})), turn("ok")]
    handle = await client.create("two", model="scripted", script=script)
    run = await handle.wait(timeout=10)
    await handle.resume(
        [
            {"interrupt_id": run.interrupts[0].interrupt_id, "approve": True},
            {"interrupt_id": run.interrupts[1].interrupt_id, "approve": True, "edits": {"x": 5}},
        ]
    )
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    outputs = [e.output async for e in handle.events() if isinstance(e, ToolCallCompleted)]
    assert sorted(outputs) == ["10", "2"]


async def test_ask_user_pauses_for_input_and_answer_continues(client: AsyncEngineClient) -> None:
    script = [turn("", ("AskUser", {"question": "Which city?"})), turn("Paris it is.")]
    handle = await client.create("plan a trip", model="scripted", script=script)
    run = await handle.wait(timeout=10)
    assert run.pause_reason == "AWAITING_INPUT"
    assert run.interrupts[0].kind == "INPUT"
    assert run.interrupts[0].question == "Which city?"
    await handle.answer(run.interrupts[0].interrupt_id, "Paris")
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"


async def test_gated_tool_waits_for_the_caller_result(client: AsyncEngineClient) -> None:
    script = [turn("", ("echo", {"text": "hi"})), turn("Got it.")]
    handle = await client.create("gated", model="scripted", script=script, gated_tools=["echo"])
    run = await handle.wait(timeout=10)
    assert run.pause_reason == "AWAITING_TOOL_RESULT"
    interrupt = run.interrupts[0]
    assert interrupt.kind == "TOOL_RESULT"
    with pytest.raises(Exception, match="respond"):
        await handle.approve(interrupt.interrupt_id)
    await handle.respond(interrupt.interrupt_id, "caller says hi")
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"


async def test_reconnect_with_last_seq_gets_each_later_event_exactly_once(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    first_part = []
    async for event in handle.events(follow=True):
        first_part.append(event)
        if isinstance(event, ApprovalRequested):
            break  # the watcher disconnects mid-run
    await handle.wait(timeout=10)
    await handle.approve((await handle.refresh()).interrupts[0].interrupt_id)
    await handle.wait(timeout=10)
    rest = [e async for e in handle.events(after_seq=first_part[-1].seq, follow=True)]
    seqs = [e.seq for e in first_part + rest]
    assert seqs == list(range(1, seqs[-1] + 1))
    assert rest[-1].kind == "run_finished"


async def test_engine_restart_then_resume_a_paused_run(servers: ServerFactory) -> None:
    config = {"tools": {"permissions": {"double": "ask"}}}
    first = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{first.port}") as c:
        handle = await c.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
        run = await handle.wait(timeout=10)
        assert run.state == "PAUSED"
        before = [e async for e in handle.events(follow=False)]
    await servers.stop_all()
    second = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{second.port}") as c:
        handle = await c.attach(run.run_id)
        assert handle.run.state == "PAUSED"
        await handle.approve(run.interrupts[0].interrupt_id)
        run = await handle.wait(timeout=10)
        assert run.state == "DONE"
        assert run.data == "The answer is 42."
        after = [e async for e in handle.events()]
    assert [e.seq for e in after] == list(range(1, len(after) + 1))
    assert [(e.seq, e.kind) for e in after[: len(before)]] == [(e.seq, e.kind) for e in before]


async def test_cancel_a_running_run(client: AsyncEngineClient) -> None:
    handle = await client.create(
        "sleep", model="scripted", script=[turn("", ("sleep", {"seconds": 20})), turn("x")]
    )
    async for event in handle.events(follow=True):
        if isinstance(event, ToolCallStarted):
            break
    run = await handle.cancel("changed my mind")
    run = await handle.wait(timeout=10)
    assert run.state == "CANCELLED"
    assert run.error is not None
    assert run.error.code == "ERR_CANCELLED"
    kinds = [e.kind async for e in handle.events()]
    assert kinds[-1] == "run_finished"


async def test_cancel_a_paused_run_and_cancel_is_idempotent(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    await handle.wait(timeout=10)
    run = await handle.cancel()
    assert run.state == "CANCELLED"
    run = await handle.cancel()
    assert run.state == "CANCELLED"


async def test_ten_concurrent_resumes_exactly_one_wins(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    interrupt_id = run.interrupts[0].interrupt_id
    results = await asyncio.gather(*(handle.approve(interrupt_id) for _ in range(10)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(
        isinstance(e, (RunNotPausedError, ConcurrentUpdateError, InterruptNotFoundError)) for e in losers
    )
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    events = [e async for e in handle.events()]
    assert sum(1 for e in events if isinstance(e, ApprovalDecided)) == 1
    assert sum(1 for e in events if isinstance(e, ToolCallCompleted)) == 1


async def test_resume_of_a_run_that_is_not_paused(client: AsyncEngineClient) -> None:
    handle = await client.create("hi", model="scripted", script=[turn("hello")])
    await handle.wait(timeout=10)
    with pytest.raises(RunNotPausedError) as caught:
        await handle.approve("int_nope")
    assert caught.value.metadata["state"] == "DONE"


async def test_unknown_interrupt_id(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    await handle.wait(timeout=10)
    with pytest.raises(InterruptNotFoundError) as caught:
        await handle.approve("int_does_not_exist")
    assert caught.value.metadata["interrupt_id"] == "int_does_not_exist"


async def test_idempotent_create_with_request_id(client: AsyncEngineClient) -> None:
    kwargs: dict[str, Any] = {"model": "scripted", "script": [turn("hi")], "request_id": "req-1"}
    handles = await asyncio.gather(*(client.create("hi", **kwargs) for _ in range(5)))
    assert len({h.run_id for h in handles}) == 1
    runs = [r async for r in client.list_runs()]
    assert len(runs) == 1


async def test_client_chosen_run_id_and_conflict(client: AsyncEngineClient) -> None:
    from client_py import RunExistsError

    handle = await client.create("hi", run_id="my-run-1", model="scripted", script=[turn("hi")])
    assert handle.run_id == "my-run-1"
    with pytest.raises(RunExistsError):
        await client.create("other", run_id="my-run-1", model="scripted", script=[turn("hi")])


async def test_list_runs_filters_and_paginates(client: AsyncEngineClient) -> None:
    for i in range(5):
        h = await client.create(
            f"t{i}", model="scripted", script=[turn("hi")], labels={"batch": "a" if i < 3 else "b"}
        )
        await h.wait(timeout=10)
    assert len([r async for r in client.list_runs(page_size=2)]) == 5
    assert len([r async for r in client.list_runs(labels={"batch": "a"})]) == 3
    assert [r async for r in client.list_runs(states=["PAUSED"])] == []


async def test_workspace_isolation(servers: ServerFactory) -> None:
    from engine_service.core._types import Principal

    keys = {"key-alice-123": Principal("alice", "alice"), "key-bob-4567": Principal("bob", "bob")}
    srv = await servers.start(api_keys=keys)
    target = f"127.0.0.1:{srv.port}"
    async with (
        AsyncEngineClient(target, api_key="key-alice-123") as alice,
        AsyncEngineClient(target, api_key="key-bob-4567") as bob,
    ):
        handle = await alice.create("secret plan", model="scripted", script=[turn("hi")])
        await handle.wait(timeout=10)
        with pytest.raises(RunNotFoundError):
            await bob.get_run(handle.run_id)
        with pytest.raises(RunNotFoundError):
            await bob.attach(handle.run_id)
        assert [r async for r in bob.list_runs()] == []
        assert [r.run_id async for r in alice.list_runs()] == [handle.run_id]
        assert handle.run.workspace_id == "alice"


async def test_client_defined_tool_pauses_for_the_callers_result(client: AsyncEngineClient) -> None:
    lookup = {
        "name": "crm_lookup",
        "description": "Look a customer up in the caller's CRM.",
        "input_schema": {
            "type": "object",
            "properties": {"email": {"type": "string"}},
            "required": ["email"],
        },
    }
    script = [turn("", ("crm_lookup", {"email": "a@b.c"})), turn("Customer found.")]
    handle = await client.create("who is a@b.c?", model="scripted", script=script, client_tools=[lookup])
    run = await handle.wait(timeout=10)
    assert run.pause_reason == "AWAITING_TOOL_RESULT"
    interrupt = run.interrupts[0]
    assert (interrupt.tool_name, interrupt.arguments) == ("crm_lookup", {"email": "a@b.c"})
    assert interrupt.input_schema is not None
    await handle.respond(interrupt.interrupt_id, {"name": "Ada", "plan": "pro"})
    assert (await handle.wait(timeout=10)).state == "DONE"


async def test_an_unanswered_approval_expires_with_the_configured_default(client: AsyncEngineClient) -> None:
    handle = await client.create(
        "double 21",
        model="scripted",
        script=DOUBLE_THEN_ANSWER,
        approval_timeout=0.2,
        approval_expiry_action="reject",
    )
    run = await handle.wait(timeout=10)
    assert run.state == "PAUSED"
    assert run.interrupts[0].expire_time is not None
    run = await handle.wait(timeout=10)  # returns at once (paused); poll until the expiry moves it on
    run = await refresh_until(handle, "DONE", tries=100)
    assert run.state == "DONE"
    events = [e async for e in handle.events(follow=False)]
    decided = next(e for e in events if isinstance(e, ApprovalDecided))
    assert (decided.decision, decided.expired, decided.decided_by) == ("reject", True, "system:expiry")
    assert not any(isinstance(e, ToolCallStarted) for e in events)


async def test_an_expired_approval_can_default_to_approve(client: AsyncEngineClient) -> None:
    handle = await client.create(
        "double 21",
        model="scripted",
        script=DOUBLE_THEN_ANSWER,
        approval_timeout=0.1,
        approval_expiry_action="approve",
    )
    await handle.wait(timeout=10)
    run = await refresh_until(handle, "DONE", tries=100)
    assert run.state == "DONE"
    outputs = [e.output async for e in handle.events(follow=False) if isinstance(e, ToolCallCompleted)]
    assert outputs == ["42"]


async def test_a_retried_resume_with_the_same_request_id_is_answered(client: AsyncEngineClient) -> None:
    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    decision = [{"interrupt_id": run.interrupts[0].interrupt_id, "action": "approve"}]
    await handle.resume(decision, request_id="resume-1")
    again = await handle.resume(decision, request_id="resume-1")
    assert again.state in ("RUNNING", "DONE")
    with pytest.raises(RunNotPausedError):
        await handle.resume(decision, request_id="resume-2")


async def test_the_decision_is_already_taken_when_answered_twice_in_one_request(
    client: AsyncEngineClient,
) -> None:
    from client_py import InterruptDecidedError

    handle = await client.create("double 21", model="scripted", script=DOUBLE_THEN_ANSWER)
    run = await handle.wait(timeout=10)
    interrupt_id = run.interrupts[0].interrupt_id
    with pytest.raises(InterruptDecidedError):
        await handle.resume(
            [
                {"interrupt_id": interrupt_id, "action": "approve"},
                {"interrupt_id": interrupt_id, "action": "reject"},
            ]
        )


async def test_every_tool_call_the_model_made_is_on_the_record(client: AsyncEngineClient) -> None:
    from client_py._view import RunViewModel

    script = [
        turn("", ("nope", {}), ("echo", {"text": "hi"}), ("double", {"x": "not a number"})),
        turn("", ("double", {"x": 1})),
        turn("done"),
    ]
    handle = await client.create("calls", model="scripted", script=script, permissions={"echo": "deny"})
    run = await handle.wait(timeout=10)
    await handle.respond(run.interrupts[0].interrupt_id, {"value": 7})
    run = await handle.wait(timeout=10)
    assert run.state == "DONE"
    events = [e async for e in handle.events(follow=False)]
    completed = {e.call_id: e for e in events if isinstance(e, ToolCallCompleted)}
    assert [(e.tool_name, e.outcome, e.is_error) for e in completed.values()] == [
        ("nope", "unknown_tool", True),
        ("echo", "denied", True),
        ("double", "invalid_arguments", True),
        ("double", "responded", False),
    ]
    assert "Unknown tool 'nope'" in completed["call_1_1"].output
    assert completed["call_2_1"].output == '{"value": 7}'
    # The widget shows each outcome and what the model saw, not an empty "responded".
    view = RunViewModel()
    for event in events:
        view.apply(event)
    shown = {entry.call_id: (entry.status, entry.output) for entry in view.tool_log}
    assert shown["call_1_1"][0] == "unknown tool"
    assert shown["call_1_2"][0] == "denied"
    assert shown["call_1_3"][0] == "invalid arguments"
    assert shown["call_2_1"] == ("responded", '{"value": 7}')


async def test_a_call_to_a_tool_this_host_cannot_run_is_on_the_record(servers: ServerFactory) -> None:
    srv = await servers.start(config={"capabilities_subprocess": False})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as c:
        script = [turn("", ("Bash", {"command": "true"})), turn("done")]
        run = await c.execute("bash", model="scripted", script=script).result()
        assert run.state == "DONE"
        events = [e async for e in (await c.attach(run.run_id)).events(follow=False)]
    (completed,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert (completed.tool_name, completed.outcome, completed.is_error) == (
        "Bash",
        "capability_missing",
        True,
    )
    assert run.meta.capabilities_missing == ["Bash"]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "openai:gpt-4o"),
        ("o3-mini", "openai:o3-mini"),
        ("claude-sonnet-4-5", "anthropic:claude-sonnet-4-5"),
        ("openai:llama-3.1-8b", "openai:llama-3.1-8b"),
        ("anthropic", "anthropic:claude-sonnet-4-5"),
    ],
)
async def test_a_bare_model_name_names_its_provider(
    client: AsyncEngineClient, model: str, expected: str
) -> None:
    """``model="gpt-4o"`` works as a newcomer expects; ``provider:name`` for the rest."""
    handle = await client.create("hi", model=model)
    assert handle.run.meta.model == expected
    await handle.cancel()


async def test_a_bare_unknown_model_name_is_the_default_providers(client: AsyncEngineClient) -> None:
    # The default provider here is the scripted one, so the name must come with a script.
    handle = await client.create("hi", model="my-local-model", script=[turn("hello")])
    run = await handle.wait(timeout=20)
    assert (run.state, run.meta.model) == ("DONE", "scripted:my-local-model")

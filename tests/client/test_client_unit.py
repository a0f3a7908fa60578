"""Unit tests of client_py: error decoding, spec building, proto conversion, reprs."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

import client_py
from client_py import _errors, _spec, _types
from client_py._errors import InvalidRequestError, InvalidScriptError
from machina.engine.v1 import engine_service_pb2 as pb
from machina.engine.v1 import event_pb2, run_pb2

T0 = timestamp_pb2.Timestamp(seconds=1_700_000_000)
DT0 = datetime.fromtimestamp(1_700_000_000, tz=UTC)


def _struct(obj: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(obj)
    return s


def _details_bin(code: int, message: str, reason: str, domain: str = "machina.dev", **meta: str) -> bytes:
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=meta))
    serialized: bytes = status.SerializeToString()
    return serialized


def _aio_error(
    code: grpc.StatusCode, details: str = "", trailer: bytes | None = None
) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if trailer is not None:
        trailing.add("grpc-status-details-bin", trailer)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


class _SyncCallError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no types: RpcError is Any
    """What the sync grpc API raises: an RpcError that is also a Call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...]) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


# --- errors -----------------------------------------------------------------------

REASONS = [
    ("ERR_INVALID_ID", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidIdError),
    ("ERR_INVALID_REQUEST", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidRequestError),
    ("ERR_VALUE_TOO_DEEP", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidRequestError),
    ("ERR_VALUE_TOO_LARGE", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidRequestError),
    ("ERR_INVALID_SCRIPT", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidScriptError),
    ("ERR_INVALID_EDITS", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidEditsError),
    ("ERR_INVALID_DECISION", grpc.StatusCode.INVALID_ARGUMENT, client_py.InvalidDecisionError),
    ("ERR_UNKNOWN_TOOL", grpc.StatusCode.INVALID_ARGUMENT, client_py.UnknownToolError),
    ("ERR_DESTINATION_REFUSED", grpc.StatusCode.INVALID_ARGUMENT, client_py.DestinationRefusedError),
    ("ERR_RUN_NOT_FOUND", grpc.StatusCode.NOT_FOUND, client_py.RunNotFoundError),
    ("ERR_INTERRUPT_NOT_FOUND", grpc.StatusCode.NOT_FOUND, client_py.InterruptNotFoundError),
    ("ERR_RESULT_NOT_FOUND", grpc.StatusCode.NOT_FOUND, client_py.ResultNotFoundError),
    ("ERR_RUN_EXISTS", grpc.StatusCode.ALREADY_EXISTS, client_py.RunExistsError),
    ("ERR_REQUEST_ID_REUSED", grpc.StatusCode.FAILED_PRECONDITION, client_py.FailedPreconditionError),
    ("ERR_RUN_NOT_PAUSED", grpc.StatusCode.FAILED_PRECONDITION, client_py.RunNotPausedError),
    ("ERR_RUN_TERMINAL", grpc.StatusCode.FAILED_PRECONDITION, client_py.RunTerminalError),
    ("ERR_INTERRUPT_DECIDED", grpc.StatusCode.FAILED_PRECONDITION, client_py.InterruptDecidedError),
    ("ERR_THREAD_NOT_FOUND", grpc.StatusCode.NOT_FOUND, client_py.ThreadNotFoundError),
    ("ERR_THREAD_EXISTS", grpc.StatusCode.ALREADY_EXISTS, client_py.ThreadExistsError),
    ("ERR_THREAD_BUSY", grpc.StatusCode.FAILED_PRECONDITION, client_py.ThreadBusyError),
    ("ERR_FORK_POINT", grpc.StatusCode.FAILED_PRECONDITION, client_py.ForkPointError),
    ("ERR_RUN_ACTIVE", grpc.StatusCode.FAILED_PRECONDITION, client_py.RunActiveError),
    ("ERR_RUN_REFERENCED", grpc.StatusCode.FAILED_PRECONDITION, client_py.RunReferencedError),
    ("ERR_CONCURRENT_UPDATE", grpc.StatusCode.ABORTED, client_py.ConcurrentUpdateError),
    ("ERR_UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, client_py.UnauthenticatedError),
    ("ERR_PERMISSION_DENIED", grpc.StatusCode.PERMISSION_DENIED, client_py.PermissionDeniedError),
    ("ERR_SHUTTING_DOWN", grpc.StatusCode.UNAVAILABLE, client_py.ShuttingDownError),
    ("ERR_STORAGE_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, client_py.StorageUnavailableError),
    ("ERR_INTERNAL", grpc.StatusCode.INTERNAL, client_py.InternalError),
]


def test_reason_table_is_complete() -> None:
    assert set(_errors._BY_REASON) == {reason for reason, _, _ in REASONS}
    for _, status, cls in REASONS:
        # The class's own status agrees with the contract, so a catch by status works too.
        assert cls.default_status == status


@pytest.mark.parametrize(("reason", "status", "cls"), REASONS)
def test_error_from_rpc_maps_each_reason(reason: str, status: grpc.StatusCode, cls: type) -> None:
    raw = _details_bin(status.value[0], f"boom {reason}", reason, run_id="r-1")
    err = client_py.error_from_rpc(_aio_error(status, "transport text", raw))
    assert type(err) is cls
    assert isinstance(err, client_py.MachinaError)
    assert err.code == reason
    assert err.message == f"boom {reason}"
    assert err.metadata == {"run_id": "r-1"}
    assert err.status == status


def test_decodes_real_trailer_from_sync_style_error() -> None:
    raw = _details_bin(code_pb2.NOT_FOUND, "run r9 not found", "ERR_RUN_NOT_FOUND", run_id="r9")
    exc = _SyncCallError(grpc.StatusCode.NOT_FOUND, "x", (("other", "v"), ("grpc-status-details-bin", raw)))
    err = client_py.error_from_rpc(exc)
    assert isinstance(err, client_py.RunNotFoundError)
    assert isinstance(err, client_py.NotFoundError)
    assert str(err) == "ERR_RUN_NOT_FOUND: run r9 not found"
    assert err.metadata == {"run_id": "r9"}


def test_private_descriptor_pool_does_not_clash_with_googleapis() -> None:
    # Both definitions of google.rpc.Status are alive in this process.
    assert _errors._Status.DESCRIPTOR.full_name == status_pb2.Status.DESCRIPTOR.full_name
    assert _errors._Status.DESCRIPTOR.file.pool is not status_pb2.Status.DESCRIPTOR.file.pool
    raw = _details_bin(3, "m", "ERR_INVALID_ID", id="!")
    decoded = _errors.decode_status_details(raw)
    assert (decoded.reason, decoded.domain, decoded.metadata) == (
        "ERR_INVALID_ID",
        "machina.dev",
        {"id": "!"},
    )


def test_error_info_is_found_among_other_details() -> None:
    status = status_pb2.Status(code=5, message="m")
    status.details.add().Pack(error_details_pb2.RetryInfo())
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="ERR_RUN_NOT_FOUND", domain="machina.dev"))
    err = client_py.error_from_rpc(_aio_error(grpc.StatusCode.NOT_FOUND, "", status.SerializeToString()))
    assert isinstance(err, client_py.RunNotFoundError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (grpc.StatusCode.UNAVAILABLE, client_py.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, client_py.DeadlineExceededError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, client_py.ResourceExhaustedError),
        (grpc.StatusCode.CANCELLED, client_py.RpcCancelledError),
        (grpc.StatusCode.NOT_FOUND, client_py.NotFoundError),
        (grpc.StatusCode.UNKNOWN, client_py.MachinaError),
        (grpc.StatusCode.DATA_LOSS, client_py.MachinaError),
    ],
)
def test_fallback_by_status_without_error_info(status: grpc.StatusCode, cls: type) -> None:
    err = client_py.error_from_rpc(_aio_error(status, "failed to connect to all addresses"))
    assert type(err) is cls
    assert err.code == status.name
    assert err.message == "failed to connect to all addresses"


def test_unknown_reason_falls_back_by_status_and_keeps_code() -> None:
    raw = _details_bin(5, "new", "ERR_SOMETHING_NEWER")
    err = client_py.error_from_rpc(_aio_error(grpc.StatusCode.NOT_FOUND, "", raw))
    assert type(err) is client_py.NotFoundError
    assert err.code == "ERR_SOMETHING_NEWER"


def test_foreign_domain_is_not_trusted() -> None:
    raw = _details_bin(5, "proxy says", "ERR_RUN_NOT_FOUND", domain="proxy.example")
    err = client_py.error_from_rpc(_aio_error(grpc.StatusCode.NOT_FOUND, "", raw))
    assert type(err) is client_py.NotFoundError
    assert err.code == "NOT_FOUND"


def test_malformed_trailer_keeps_the_original_error() -> None:
    err = client_py.error_from_rpc(_aio_error(grpc.StatusCode.INTERNAL, "oops", b"\xff\xff\xff"))
    assert type(err) is client_py.InternalError
    assert err.message == "oops"


def test_errors_pickle_and_repr() -> None:
    err = client_py.RunNotFoundError(
        "ERR_RUN_NOT_FOUND", "gone", status=grpc.StatusCode.NOT_FOUND, metadata={"run_id": "r"}
    )
    again = pickle.loads(pickle.dumps(err))  # noqa: S301 - our own bytes, round-tripped
    assert type(again) is client_py.RunNotFoundError
    assert (again.code, again.message, again.status, again.metadata) == (
        err.code,
        err.message,
        err.status,
        err.metadata,
    )
    assert repr(err) == (
        "RunNotFoundError(code='ERR_RUN_NOT_FOUND', message='gone', status=NOT_FOUND, "
        "metadata={'run_id': 'r'})"
    )


# --- spec -------------------------------------------------------------------------


def test_spec_tools_none_vs_empty() -> None:
    assert not client_py._spec.build_run_spec("t").HasField("tools")
    empty = _spec.build_run_spec("t", tools=[])
    assert empty.HasField("tools")
    assert list(empty.tools.names) == []
    # Presence must survive the wire, or [] would mean "all tools" on the server.
    assert pb.RunSpec.FromString(empty.SerializeToString()).HasField("tools")
    assert list(_spec.build_run_spec("t", tools=["a", "b"]).tools.names) == ["a", "b"]


def test_spec_limits_and_timeouts() -> None:
    spec = _spec.build_run_spec(
        "t",
        max_turns=5,
        max_tokens=1000,
        timeout=2.5,
        max_cost_usd=0.25,
        approval_timeout=0.0001,
        max_output_tokens=256,
    )
    assert spec.limits.max_turns == 5
    assert spec.limits.max_tokens == 1000
    assert spec.limits.timeout_ms == 2500
    assert spec.limits.max_cost_usd == 0.25
    # A tiny timeout must not become 0, which means "no timeout".
    assert spec.approval_timeout_ms == 1
    assert spec.model.max_output_tokens == 256
    assert not _spec.build_run_spec("t").HasField("limits")


def test_spec_full() -> None:
    spec = _spec.build_run_spec(
        "do it",
        run_id="r-1",
        request_id="req-1",
        script=[
            {"text": "hi", "tool_calls": [{"name": "search", "arguments": {"q": "x"}}]},
            {"text": "done", "usage": {"input_tokens": 3, "output_tokens": 4}},
            "bare text",
        ],
        tool_choice="Required",
        permissions={"shell": "ask", "search": "allow"},
        gated_tools=["lookup"],
        output_schema={"type": "object"},
        system_prompt="be brief",
        approval_expiry_action="approve",
        labels={"team": "a"},
    )
    assert spec.task == "do it"
    assert (spec.run_id, spec.request_id) == ("r-1", "req-1")
    assert spec.model.provider == "scripted"
    assert [t.text for t in spec.model.script] == ["hi", "done", "bare text"]
    assert spec.model.script[0].tool_calls[0].name == "search"
    assert dict(spec.model.script[0].tool_calls[0].arguments) == {"q": "x"}
    assert spec.model.script[1].usage.output_tokens == 4
    assert spec.tool_choice == run_pb2.TOOL_CHOICE_REQUIRED
    assert dict(spec.permissions) == {"shell": run_pb2.PERMISSION_ASK, "search": run_pb2.PERMISSION_ALLOW}
    assert list(spec.gated_tools) == ["lookup"]
    assert spec.output_schema["type"] == "object"
    assert spec.system_prompt == "be brief"
    assert spec.approval_expiry_action == run_pb2.EXPIRY_ACTION_APPROVE
    assert dict(spec.labels) == {"team": "a"}


def test_spec_model_shorthand() -> None:
    spec = _spec.build_run_spec("t", model="anthropic:claude-sonnet-4-5")
    assert (spec.model.provider, spec.model.name) == ("anthropic", "claude-sonnet-4-5")
    spec = _spec.build_run_spec("t", model="gpt-4o")  # a bare model name: the engine infers openai
    assert (spec.model.provider, spec.model.name) == ("", "gpt-4o")
    spec = _spec.build_run_spec("t", model="OpenAI")
    assert (spec.model.provider, spec.model.name) == ("openai", "")
    spec = _spec.build_run_spec("t", model="openai", model_name="gpt-4o-mini")
    assert (spec.model.provider, spec.model.name) == ("openai", "gpt-4o-mini")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"tool_choice": "sometimes"}, InvalidRequestError, "tool_choice"),
        ({"permissions": {"shell": "maybe"}}, InvalidRequestError, "permissions"),
        ({"approval_expiry_action": "ignore"}, InvalidRequestError, "approval_expiry_action"),
        ({"max_turns": 0}, InvalidRequestError, "max_turns"),
        ({"max_turns": True}, InvalidRequestError, "max_turns"),
        ({"timeout": -1}, InvalidRequestError, "timeout"),
        ({"timeout": float("inf")}, InvalidRequestError, "timeout"),
        ({"tools": "search"}, InvalidRequestError, "tools"),
        ({"script": [{"txt": "typo"}]}, InvalidScriptError, "unknown keys"),
        ({"script": [{"tool_calls": [{"arguments": {}}]}]}, InvalidScriptError, "name"),
        ({"script": ["x"], "model": "openai"}, InvalidScriptError, "scripted"),
        ({"output_schema": {"x": object()}}, InvalidRequestError, "output_schema"),
        ({"labels": {"a": 1}}, InvalidRequestError, "labels"),
        ({"max_turn": 3}, TypeError, "unexpected keyword"),
    ],
)
def test_spec_rejects_obvious_mistakes(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _spec.build_run_spec("t", **options)


def test_decisions_to_proto() -> None:
    plain = _spec.decision_to_proto(client_py.Approve("i1"))
    assert plain.WhichOneof("action") == "approve"
    assert not plain.approve.HasField("edited_arguments")
    edited = _spec.decision_to_proto(client_py.Approve("i1", edits={}))
    assert edited.approve.HasField("edited_arguments")
    rejected = _spec.decision_to_proto(client_py.Reject("i2"))
    assert rejected.WhichOneof("action") == "reject"
    null = _spec.decision_to_proto(client_py.Respond("i3", None))
    assert null.WhichOneof("action") == "respond"
    assert null.respond.output.WhichOneof("kind") == "null_value"
    as_dict = _spec.decision_to_proto({"interrupt_id": "i4", "action": "respond", "output": {"n": [1, 2]}})
    assert as_dict.respond.output.struct_value["n"] == [1, 2]
    as_dict = _spec.decision_to_proto({"interrupt_id": "i5", "action": "reject", "reason": "no"})
    assert as_dict.reject.reason == "no"
    keyed = _spec.decision_to_proto({"interrupt_id": "i6", "approve": True, "edits": {"x": 5}})
    assert keyed.approve.edited_arguments["x"] == 5
    keyed = _spec.decision_to_proto({"interrupt_id": "i7", "reject": True, "reason": "no"})
    assert keyed.reject.reason == "no"
    keyed = _spec.decision_to_proto({"interrupt_id": "i8", "respond": "blue"})
    assert keyed.respond.output.string_value == "blue"
    with pytest.raises(ValueError, match="exactly one"):
        _spec.decision_to_proto({"interrupt_id": "i", "approve": True, "reject": True})
    with pytest.raises(ValueError, match="must be True"):
        _spec.decision_to_proto({"interrupt_id": "i", "approve": False})
    with pytest.raises(ValueError, match="action"):
        _spec.decision_to_proto({"interrupt_id": "i", "action": "maybe"})
    with pytest.raises(ValueError, match="unknown keys"):
        _spec.decision_to_proto({"interrupt_id": "i", "action": "approve", "reason": "x"})
    with pytest.raises(ValueError, match="output"):
        _spec.decision_to_proto({"interrupt_id": "i", "action": "respond"})


def test_states_to_proto() -> None:
    assert _spec.states_to_proto(["paused", "DONE"]) == [run_pb2.RUN_STATE_PAUSED, run_pb2.RUN_STATE_DONE]
    with pytest.raises(ValueError, match="unknown run state"):
        _spec.states_to_proto(["sleeping"])


# --- conversion -------------------------------------------------------------------


def _interrupt_proto(**overrides: Any) -> run_pb2.Interrupt:
    fields: dict[str, Any] = {
        "interrupt_id": "i1",
        "kind": run_pb2.INTERRUPT_KIND_APPROVAL,
        "call_id": "c1",
        "tool_name": "shell",
        "arguments": _struct({"cmd": "ls", "n": 3, "f": 1.5}),
        "description": "run ls",
        "create_time": T0,
    }
    fields.update(overrides)
    return run_pb2.Interrupt(**fields)


def _meta_proto() -> run_pb2.RunMeta:
    return run_pb2.RunMeta(
        turns=2,
        usage=run_pb2.Usage(input_tokens=10, output_tokens=5),
        cost_usd=0.5,
        duration_ms=1200,
        capabilities_missing=["gpu"],
        model="scripted:default",
    )


def _event_cases() -> list[tuple[str, Any, type, dict[str, Any]]]:
    interrupt = _types.interrupt_from_proto(_interrupt_proto())
    return [
        ("run_started", event_pb2.RunStarted(task="t", model="m"), client_py.RunStarted, {"task": "t"}),
        (
            "text_delta",
            event_pb2.TextDelta(text="he", turn=1),
            client_py.TextDelta,
            {"text": "he", "turn": 1},
        ),
        (
            "assistant_message",
            event_pb2.AssistantMessage(
                text="x",
                turn=2,
                tool_calls=[event_pb2.ToolCall(call_id="c", tool_name="s", arguments=_struct({"a": 1}))],
            ),
            client_py.AssistantMessage,
            {"tool_calls": [client_py.ToolCall("c", "s", {"a": 1})], "turn": 2},
        ),
        (
            "tool_call_started",
            event_pb2.ToolCallStarted(call=event_pb2.ToolCall(call_id="c", tool_name="s")),
            client_py.ToolCallStarted,
            {"call": client_py.ToolCall("c", "s", {})},
        ),
        (
            "tool_call_completed",
            event_pb2.ToolCallCompleted(
                call_id="c", tool_name="s", is_error=True, size_bytes=9, output="out", duration_ms=7
            ),
            client_py.ToolCallCompleted,
            {"is_error": True, "size_bytes": 9, "output": "out", "duration_ms": 7},
        ),
        (
            "approval_requested",
            event_pb2.InterruptRaised(interrupt=_interrupt_proto()),
            client_py.ApprovalRequested,
            {"interrupt": interrupt},
        ),
        (
            "approval_decided",
            event_pb2.InterruptDecided(
                interrupt_id="i1",
                decision="reject",
                decided_by="alice",
                decide_time=T0,
                arguments_sha256="ab",
                expired=True,
                reason="no",
            ),
            client_py.ApprovalDecided,
            {
                "decision": "reject",
                "decided_by": "alice",
                "decide_time": DT0,
                "expired": True,
                "reason": "no",
            },
        ),
        (
            "input_requested",
            event_pb2.InterruptRaised(interrupt=_interrupt_proto()),
            client_py.InputRequested,
            {"interrupt": interrupt},
        ),
        (
            "tool_result_requested",
            event_pb2.InterruptRaised(interrupt=_interrupt_proto()),
            client_py.ToolResultRequested,
            {"interrupt": interrupt},
        ),
        (
            "paused",
            event_pb2.Paused(
                pause=run_pb2.Pause(
                    reason=run_pb2.PAUSE_REASON_AWAITING_APPROVAL, interrupts=[_interrupt_proto()]
                )
            ),
            client_py.Paused,
            {"reason": "AWAITING_APPROVAL", "interrupts": [interrupt]},
        ),
        ("resumed", event_pb2.Resumed(resumed_by="bob"), client_py.Resumed, {"resumed_by": "bob"}),
        (
            "usage",
            event_pb2.UsageReported(
                turn=1, usage=run_pb2.Usage(input_tokens=4, output_tokens=2), cost_usd=0.1
            ),
            client_py.UsageReported,
            {"turn": 1, "input_tokens": 4, "output_tokens": 2, "cost_usd": 0.1},
        ),
        (
            "usage",
            event_pb2.UsageReported(
                turn=2,
                usage=run_pb2.Usage(
                    input_tokens=40, output_tokens=2, cache_read_tokens=30, cache_write_tokens=5
                ),
            ),
            client_py.UsageReported,
            {"turn": 2, "input_tokens": 40, "cache_read_tokens": 30, "cache_write_tokens": 5},
        ),
        (
            "context_compacted",
            event_pb2.ContextCompacted(
                turn=9,
                turns_summarized=4,
                tokens_before=900,
                tokens_after=300,
                usage=run_pb2.Usage(input_tokens=850, output_tokens=60),
                cost_usd=0.01,
            ),
            client_py.ContextCompacted,
            {
                "turn": 9,
                "turns_summarized": 4,
                "tokens_before": 900,
                "tokens_after": 300,
                "usage": client_py.Usage(850, 60),
                "cost_usd": 0.01,
            },
        ),
        (
            "api_call",
            event_pb2.ApiCallMetered(
                service="gh", method="GET", path="/x", status=200, latency_ms=12, bytes_in=99
            ),
            client_py.ApiCallMetered,
            {"service": "gh", "status": 200, "bytes_in": 99},
        ),
        (
            "handoff_to_runner",
            event_pb2.HandoffToRunner(tools=["gpu_tool"]),
            client_py.HandoffToRunner,
            {"tools": ["gpu_tool"]},
        ),
        (
            "run_finished",
            event_pb2.RunFinished(
                state=run_pb2.RUN_STATE_FAILED,
                error=run_pb2.RunError(code="ERR_MAX_TURNS", message="too many", metadata={"max": "3"}),
                meta=_meta_proto(),
            ),
            client_py.RunFinished,
            {
                "state": "FAILED",
                "data": None,
                "error": client_py.RunError("ERR_MAX_TURNS", "too many", {"max": "3"}),
            },
        ),
        (
            "agent_started",
            event_pb2.AgentStarted(task="sub", tools=["echo"], max_turns=5, max_tokens=100),
            client_py.AgentStarted,
            {"task": "sub", "tools": ["echo"], "max_turns": 5, "max_tokens": 100, "max_cost_usd": 0.0},
        ),
        (
            "agent_finished",
            event_pb2.AgentFinished(state=run_pb2.RUN_STATE_DONE, output="answer", meta=_meta_proto()),
            client_py.AgentFinished,
            {"state": "DONE", "output": "answer", "error": None},
        ),
    ]


def test_an_events_agent_path_is_kept() -> None:
    proto = event_pb2.RunEvent(run_id="r1", seq=7, time=T0, agent_path="call_1_1/call_2_1")
    proto.text_delta.CopyFrom(event_pb2.TextDelta(text="hi", turn=1))
    event = _types.event_from_proto(proto)
    assert isinstance(event, client_py.TextDelta)
    assert (event.agent_path, event.text) == ("call_1_1/call_2_1", "hi")
    assert "[call_1_1/call_2_1]" in str(event)
    interrupt = run_pb2.Interrupt(interrupt_id="i", agent_path="call_1_1", create_time=T0)
    assert _types.interrupt_from_proto(interrupt).agent_path == "call_1_1"


def test_every_oneof_case_has_an_event_class() -> None:
    oneof = event_pb2.RunEvent.DESCRIPTOR.oneofs_by_name["kind"]
    assert {f.name for f in oneof.fields} == set(_types.EVENT_TYPES)
    assert {case[0] for case in _event_cases()} == set(_types.EVENT_TYPES)


@pytest.mark.parametrize(("field", "message", "cls", "expected"), _event_cases(), ids=lambda v: str(v)[:20])
def test_event_from_proto(field: str, message: Any, cls: type, expected: dict[str, Any]) -> None:
    proto = event_pb2.RunEvent(run_id="r1", seq=7, time=T0)
    getattr(proto, field).CopyFrom(message)
    event = _types.event_from_proto(proto)
    assert type(event) is cls
    assert isinstance(event, client_py.RunEvent)
    assert event.kind == field
    assert (event.run_id, event.seq, event.time) == ("r1", 7, DT0)
    for name, value in expected.items():
        assert getattr(event, name) == value, name
    assert str(event).startswith(f"#7 {field}")
    assert repr(event).startswith(f"{cls.__name__}(run_id='r1', seq=7")


def test_event_without_known_kind_is_unknown_event() -> None:
    event = _types.event_from_proto(event_pb2.RunEvent(run_id="r1", seq=3, time=T0))
    assert type(event) is client_py.UnknownEvent
    assert event.seq == 3


def test_run_from_proto_paused() -> None:
    proto = run_pb2.Run(
        run_id="r1",
        workspace_id="w",
        state=run_pb2.RUN_STATE_PAUSED,
        pause=run_pb2.Pause(
            reason=run_pb2.PAUSE_REASON_AWAITING_INPUT,
            interrupts=[
                _interrupt_proto(
                    kind=run_pb2.INTERRUPT_KIND_INPUT,
                    question="which?",
                    expire_time=timestamp_pb2.Timestamp(seconds=1_700_000_060),
                    input_schema=_struct({"type": "object"}),
                )
            ],
        ),
        meta=_meta_proto(),
        create_time=T0,
        update_time=T0,
        task="task",
        last_seq=9,
    )
    run = _types.run_from_proto(proto)
    assert (run.state, run.pause_reason, run.paused, run.done) == ("PAUSED", "AWAITING_INPUT", True, False)
    interrupt = run.interrupts[0]
    assert interrupt.kind == "INPUT"
    assert interrupt.question == "which?"
    assert interrupt.arguments == {"cmd": "ls", "n": 3, "f": 1.5}
    assert type(interrupt.arguments["n"]) is int
    assert interrupt.expire_time == datetime.fromtimestamp(1_700_000_060, tz=UTC)
    assert interrupt.input_schema == {"type": "object"}
    assert run.meta == client_py.RunMeta(2, client_py.Usage(10, 5), 0.5, 1200, ["gpu"], "scripted:default")
    assert run.meta.usage.total_tokens == 15
    assert (run.create_time, run.last_seq, run.task) == (DT0, 9, "task")
    assert run.data is None
    assert run.error is None


def test_run_from_proto_done_and_optional_fields() -> None:
    data = struct_pb2.Value()
    data.struct_value.update({"answer": 42, "items": ["a", None, True]})
    run = _types.run_from_proto(run_pb2.Run(run_id="r", state=run_pb2.RUN_STATE_DONE, data=data))
    assert run.done
    assert run.data == {"answer": 42, "items": ["a", None, True]}
    assert run.pause_reason is None
    assert run.interrupts == []
    interrupt = _types.interrupt_from_proto(_interrupt_proto())
    assert interrupt.expire_time is None
    assert interrupt.input_schema is None
    future = _types.run_from_proto(run_pb2.Run(state=99))  # type: ignore[arg-type]
    assert future.state == "UNKNOWN_99"


def test_json_round_trip() -> None:
    from client_py._json import python_to_value, value_to_python

    value = {"a": [1, 2.5, "x", None, False, {"b": {}}], "big": 2**60}
    assert value_to_python(python_to_value(value)) == {**value, "big": float(2**60)}
    with pytest.raises(ValueError, match="JSON number"):
        python_to_value(float("nan"))
    with pytest.raises(InvalidRequestError, match="keys must be str"):
        python_to_value({1: "x"})


# --- reprs ------------------------------------------------------------------------

EVIL = "<script>alert('x')</script>&"


def _evil_run() -> client_py.Run:
    return _types.run_from_proto(
        run_pb2.Run(
            run_id=f"r{EVIL}",
            state=run_pb2.RUN_STATE_PAUSED,
            task=EVIL,
            pause=run_pb2.Pause(
                reason=run_pb2.PAUSE_REASON_AWAITING_APPROVAL,
                interrupts=[_interrupt_proto(tool_name=EVIL, description=EVIL, interrupt_id=EVIL)],
            ),
            error=run_pb2.RunError(code=EVIL, message=EVIL),
            data=struct_pb2.Value(string_value=EVIL),
            meta=run_pb2.RunMeta(model=EVIL),
        )
    )


def test_run_html_escapes_every_value() -> None:
    page = _evil_run()._repr_html_()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    assert "PAUSED" in page
    assert "AWAITING_APPROVAL" in page


def test_run_text_reprs_are_readable() -> None:
    run = _evil_run()
    assert repr(run).startswith("Run(run_id=")
    assert "state='PAUSED'" in repr(run)
    text = str(run)
    assert text.splitlines()[0].startswith("Run r<script>")
    assert "PAUSED (AWAITING_APPROVAL)" in text
    assert "pending" in text
    long = _types.event_from_proto(
        event_pb2.RunEvent(run_id="r", seq=1, time=T0, text_delta=event_pb2.TextDelta(text="x" * 500))
    )
    assert len(str(long)) < 100


def test_public_api_is_pinned() -> None:
    assert sorted(client_py.__all__) == [
        "AbortedError",
        "AgentFinished",
        "AgentStarted",
        "AlreadyExistsError",
        "ApiCallMetered",
        "ApprovalDecided",
        "ApprovalRequested",
        "Approve",
        "AssistantMessage",
        "AsyncEngineClient",
        "AsyncExecution",
        "AsyncRunHandle",
        "AsyncThreadHandle",
        "CallOptions",
        "ConcurrentUpdateError",
        "ContextCompacted",
        "DeadlineExceededError",
        "Decision",
        "DecisionLike",
        "DestinationRefusedError",
        "EngineClient",
        "Execution",
        "FailedPreconditionError",
        "ForkPointError",
        "HandoffToRunner",
        "InputRequested",
        "InternalError",
        "Interrupt",
        "InterruptDecidedError",
        "InterruptNotFoundError",
        "InvalidArgumentError",
        "InvalidDecisionError",
        "InvalidEditsError",
        "InvalidIdError",
        "InvalidRequestError",
        "InvalidScriptError",
        "MachinaError",
        "NotFoundError",
        "PauseReason",
        "Paused",
        "PermissionDeniedError",
        "ProgressLine",
        "Reject",
        "RequestTooLargeError",
        "ResourceExhaustedError",
        "Respond",
        "ResultNotFoundError",
        "Resumed",
        "RetentionReport",
        "RetryPolicy",
        "RpcCancelledError",
        "Run",
        "RunActiveError",
        "RunError",
        "RunEvent",
        "RunExistsError",
        "RunFinished",
        "RunHandle",
        "RunMeta",
        "RunNotFoundError",
        "RunNotPausedError",
        "RunOptions",
        "RunReferencedError",
        "RunStarted",
        "RunState",
        "RunTerminalError",
        "ShuttingDownError",
        "StorageUnavailableError",
        "TextDelta",
        "Thread",
        "ThreadBusyError",
        "ThreadExistsError",
        "ThreadHandle",
        "ThreadNotFoundError",
        "ToolCall",
        "ToolCallCompleted",
        "ToolCallStarted",
        "ToolResultRequested",
        "UnauthenticatedError",
        "UnavailableError",
        "UnimplementedError",
        "UnknownEvent",
        "UnknownToolError",
        "Usage",
        "UsageReported",
        "error_from_rpc",
        "print_events",
    ]
    for name in client_py.__all__:
        assert getattr(client_py, name) is not None


def test_client_repr_hides_api_key() -> None:
    client = client_py.AsyncEngineClient("h:1", api_key="sk-secret")
    assert "sk-secret" not in repr(client)


def test_run_state_is_an_enum_that_is_its_string() -> None:
    import json
    import pickle

    from client_py._types import run_from_proto
    from machina.engine.v1 import run_pb2

    pause = run_pb2.Pause(reason=run_pb2.PAUSE_REASON_AWAITING_APPROVAL)
    run = run_from_proto(run_pb2.Run(run_id="r1", state=run_pb2.RUN_STATE_PAUSED, pause=pause))
    assert run.state == "PAUSED"
    assert run.state is client_py.RunState.PAUSED
    assert str(run.state) == "PAUSED"
    assert f"{run.state}" == "PAUSED"
    assert run.pause_reason == "AWAITING_APPROVAL"
    assert run.pause_reason is client_py.PauseReason.AWAITING_APPROVAL
    assert json.dumps({"state": run.state, "reason": run.pause_reason}) == (
        '{"state": "PAUSED", "reason": "AWAITING_APPROVAL"}'
    )
    restored = pickle.loads(pickle.dumps(run.state))  # noqa: S301 - our own bytes
    assert restored is client_py.RunState.PAUSED
    assert "state='PAUSED'" in repr(run)
    # A state newer than this client stays a readable string.
    newer = run_from_proto(run_pb2.Run(run_id="r2", state=99))  # type: ignore[arg-type]
    assert newer.state == "UNKNOWN_99"
    assert not isinstance(newer.state, client_py.RunState)

"""Translation between protobuf messages and the engine's domain types.

Only the modules of ``api/`` import generated code; the core never sees a protobuf
message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from engine_service.core._errors import invalid, shown
from engine_service.core._limits import MAX_DEPTH, MAX_SCHEMA_BYTES, too_deep
from engine_service.core._run import (
    AgentState,
    ClientToolDef,
    Decision,
    DecisionAction,
    Interrupt,
    RunError,
    RunMeta,
    RunRecord,
    RunSpec,
    ScriptedTurn,
)
from engine_service.core._threads import Thread
from engine_service.core._types import Event, EventKind, JsonObject, Permission, RunState, ToolChoice, Usage
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import event_pb2 as ev
from machina.engine.v1 import run_pb2 as rp

log = logging.getLogger("machina.engine")

_PERMISSIONS = {
    rp.PERMISSION_ALLOW: Permission.ALLOW,
    rp.PERMISSION_ASK: Permission.ASK,
    rp.PERMISSION_DENY: Permission.DENY,
}
_TOOL_CHOICE = {
    rp.TOOL_CHOICE_UNSPECIFIED: ToolChoice.AUTO,
    rp.TOOL_CHOICE_AUTO: ToolChoice.AUTO,
    rp.TOOL_CHOICE_REQUIRED: ToolChoice.REQUIRED,
    rp.TOOL_CHOICE_NONE: ToolChoice.NONE,
}
_STATE = {s: rp.RunState.Value(f"RUN_STATE_{s.value}") for s in RunState}
_STATE_FROM = {v: k for k, v in _STATE.items()}
_REASON = {
    name: rp.PauseReason.Value(f"PAUSE_REASON_{name}")
    for name in ("AWAITING_APPROVAL", "AWAITING_TOOL_RESULT", "AWAITING_INPUT", "HANDOFF_TO_RUNNER")
}
_KIND = {
    name: rp.InterruptKind.Value(f"INTERRUPT_KIND_{name}") for name in ("APPROVAL", "TOOL_RESULT", "INPUT")
}


def struct_to_dict(message: struct_pb2.Struct, field: str = "") -> JsonObject:
    doc: JsonObject = _integral(_to_python(message, field))
    return doc


def schema_to_dict(message: struct_pb2.Struct, field: str) -> JsonObject:
    """A JSON Schema from a request: `struct_to_dict`, at most `MAX_SCHEMA_BYTES`."""
    size = message.ByteSize()
    if size > MAX_SCHEMA_BYTES:
        raise invalid(
            "ERR_VALUE_TOO_LARGE",
            f"{field} is {size} bytes; the limit is {MAX_SCHEMA_BYTES}",
            field=field,
            size=size,
            max_bytes=MAX_SCHEMA_BYTES,
        )
    return struct_to_dict(message, field)


def value_to_python(message: struct_pb2.Value, field: str = "") -> Any:
    return _integral(_to_python(message, field))


def _to_python(message: Any, field: str) -> Any:
    try:
        value = json_format.MessageToDict(message)
    except ValueError:
        # NaN and Infinity are valid protobuf doubles but not JSON.
        raise invalid("ERR_INVALID_REQUEST", "JSON values cannot be NaN or Infinity", field=field) from None
    except RecursionError:
        value = None
    if value is None or too_deep(value):
        # Deeper than this, a value would break the responses that carry it back (protobuf's
        # recursion limit): refused here, at the door.
        raise invalid(
            "ERR_VALUE_TOO_DEEP",
            f"{field or 'a structured value'} is nested deeper than {MAX_DEPTH} levels",
            field=field,
            max_depth=MAX_DEPTH,
        )
    return value


def _integral(value: Any) -> Any:
    """Struct has only doubles: give back ints for integral numbers (21.0 -> 21)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


# What a stored value that cannot be rendered (nested past MAX_DEPTH, or not JSON) becomes in a
# response: the response still renders, and says what it left out.
OMITTED = f"[omitted: not renderable as a protobuf value (nested deeper than {MAX_DEPTH} levels?)]"


def _struct(doc: JsonObject | None) -> struct_pb2.Struct | None:
    if doc is None:
        return None
    out = struct_pb2.Struct()
    if too_deep(doc):
        out.update({"omitted": OMITTED})
        return out
    try:
        out.update(doc)
    except (ValueError, TypeError, RecursionError):
        out.Clear()
        out.update({"omitted": OMITTED})
    return out


def _value(value: Any) -> struct_pb2.Value | None:
    if value is None:
        return None
    if too_deep(value):
        return struct_pb2.Value(string_value=OMITTED)
    try:
        return json_format.ParseDict(value, struct_pb2.Value())
    except (json_format.ParseError, ValueError, TypeError, RecursionError):
        return struct_pb2.Value(string_value=OMITTED)


def _time(t: float) -> timestamp_pb2.Timestamp:
    seconds = int(t)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=int((t - seconds) * 1e9))


def api_services_from_proto(api: svc.ApiSpec) -> list[JsonObject]:
    """ApiService messages as dicts for ApiService.model_validate (unset fields take the defaults)."""
    out = []
    for s in api.services:
        auth = {
            k: v for k, v in json_format.MessageToDict(s.auth, preserving_proto_field_name=True).items() if v
        }
        doc: JsonObject = {"name": s.name, "base_url": s.base_url, "auth": auth or {"type": "none"}}
        if s.allowed_paths:
            doc["allowed_paths"] = list(s.allowed_paths)
        if s.allowed_methods:
            doc["allowed_methods"] = list(s.allowed_methods)
        if s.max_body_bytes:
            doc["max_body_bytes"] = s.max_body_bytes
        if s.max_response_bytes:
            doc["max_response_bytes"] = s.max_response_bytes
        if s.timeout_ms:
            doc["timeout_s"] = s.timeout_ms / 1000
        if s.headers:
            doc["headers"] = dict(s.headers)
        out.append(doc)
    return out


def _script_from_proto(turns: Any, where: str) -> list[ScriptedTurn]:
    script = []
    for turn in turns:
        usage = _usage_from_proto(turn.usage) if turn.HasField("usage") else None
        calls = [
            (c.name, struct_to_dict(c.arguments, f"{where}.tool_calls.arguments")) for c in turn.tool_calls
        ]
        script.append(ScriptedTurn(turn.text, calls, usage))
    return script


def spec_from_proto(message: svc.RunSpec) -> tuple[RunSpec, list[ClientToolDef]]:
    model = message.model
    script = _script_from_proto(model.script, "model.script") if model.script else None
    agent_scripts = {
        s.agent_path: _script_from_proto(s.script, "model.agent_scripts.script") for s in model.agent_scripts
    }
    permissions = {}
    for name, value in message.permissions.items():
        if value not in _PERMISSIONS:
            raise invalid(
                "ERR_INVALID_REQUEST",
                f"permission for {shown(name)!r} must be ALLOW, ASK or DENY",
                field="permissions",
                tool=shown(name),
            )
        permissions[name] = _PERMISSIONS[value]
    if message.tool_choice not in _TOOL_CHOICE:
        raise invalid("ERR_INVALID_REQUEST", "unknown tool_choice value", field="tool_choice")
    if message.approval_expiry_action not in rp.ExpiryAction.values():
        # An open enum keeps values it does not know: one this engine does not define is refused,
        # never read as a default.
        raise invalid(
            "ERR_INVALID_REQUEST",
            f"unknown approval_expiry_action value {message.approval_expiry_action}",
            field="approval_expiry_action",
        )
    spec = RunSpec(
        task=message.task,
        run_id=message.run_id,
        request_id=message.request_id,
        model_provider=model.provider,
        model_name=model.name,
        script=script,
        max_output_tokens=model.max_output_tokens,
        context_window_tokens=model.context_window_tokens,
        max_turns=message.limits.max_turns,
        max_tokens=message.limits.max_tokens,
        timeout_ms=message.limits.timeout_ms,
        max_cost_usd=message.limits.max_cost_usd,
        tool_choice=_TOOL_CHOICE[message.tool_choice],
        tools=list(message.tools.names) if message.HasField("tools") else None,
        permissions=permissions,
        gated_tools=list(message.gated_tools),
        output_schema=(
            schema_to_dict(message.output_schema, "output_schema")
            if message.HasField("output_schema")
            else None
        ),
        system_prompt=message.system_prompt,
        approval_timeout_ms=message.approval_timeout_ms,
        approval_expiry_approves=message.approval_expiry_action == rp.EXPIRY_ACTION_APPROVE,
        labels=dict(message.labels),
        api_services=api_services_from_proto(message.api),
        mcp_servers=list(message.mcp_servers.servers) if message.HasField("mcp_servers") else None,
        sandbox_network=message.sandbox_network if message.HasField("sandbox_network") else None,
        thread_id=message.thread_id,
        fork_from=(
            {
                "run_id": message.fork_from.run_id,
                "turn": message.fork_from.turn,
                "seq": message.fork_from.seq,
            }
            if message.HasField("fork_from")
            else None
        ),
        agent_scripts=agent_scripts,
    )
    client_tools = [
        ClientToolDef(
            t.name,
            t.description,
            schema_to_dict(t.input_schema, "client_tools.input_schema")
            if t.HasField("input_schema")
            else {"type": "object"},
        )
        for t in message.client_tools
    ]
    return spec, client_tools


def webhook_from_proto(message: svc.RunSpec | svc.ResumeRunRequest) -> JsonObject | None:
    """The ``webhook`` field of ``message`` as the engine's dict, or None when it is not set."""
    if not message.HasField("webhook"):
        return None
    hook = message.webhook
    return {
        "url": hook.url,
        "secret_ref": hook.secret_ref,
        "events": list(hook.events),
        "headers": dict(hook.headers),
    }


def decision_from_proto(message: svc.Decision) -> Decision:
    action = message.WhichOneof("action")
    if action == "approve":
        edits = (
            struct_to_dict(message.approve.edited_arguments, "decisions.approve.edited_arguments")
            if message.approve.HasField("edited_arguments")
            else None
        )
        return Decision(message.interrupt_id, DecisionAction.APPROVE, edited_arguments=edits)
    if action == "reject":
        return Decision(message.interrupt_id, DecisionAction.REJECT, reason=message.reject.reason[:2000])
    if action == "respond":
        return Decision(
            message.interrupt_id,
            DecisionAction.RESPOND,
            output=value_to_python(message.respond.output, "decisions.respond.output"),
        )
    raise invalid(
        "ERR_INVALID_DECISION",
        f"decision for {shown(message.interrupt_id)!r} sets no action",
        interrupt_id=shown(message.interrupt_id, 128),
    )


def states_from_proto(values: Any) -> set[RunState]:
    out = set()
    for value in values:
        if value not in _STATE_FROM:
            raise invalid("ERR_INVALID_REQUEST", f"unknown run state {value}", field="states")
        out.add(_STATE_FROM[value])
    return out


def interrupt_to_proto(i: Interrupt) -> rp.Interrupt:
    return rp.Interrupt(
        interrupt_id=i.interrupt_id,
        kind=_KIND[i.kind.value],
        call_id=i.call_id,
        tool_name=i.tool_name,
        arguments=_struct(i.arguments),
        description=i.description,
        question=i.question,
        create_time=_time(i.created_at),
        expire_time=_time(i.expires_at) if i.expires_at else None,
        input_schema=_struct(i.input_schema),
        agent_path=i.agent_path,
    )


def _error(e: RunError | None) -> rp.RunError | None:
    return None if e is None else rp.RunError(code=e.code, message=e.message, metadata=e.metadata)


def _usage(u: Usage) -> rp.Usage:
    return rp.Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
    )


def _usage_from_proto(u: rp.Usage) -> Usage:
    return Usage(u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens)


def _meta(m: RunMeta) -> rp.RunMeta:
    return rp.RunMeta(
        turns=m.turns,
        usage=_usage(m.usage),
        cost_usd=m.cost_usd,
        duration_ms=m.duration_ms,
        capabilities_missing=m.capabilities_missing,
        model=m.model,
    )


def run_to_proto(r: RunRecord) -> rp.Run:
    """``r`` as a Run message; a run whose stored values cannot be rendered comes back degraded
    (values replaced by `OMITTED`) so that it never fails the response that lists it."""
    try:
        return _run_to_proto(r)
    except Exception:
        log.exception("run %s cannot be rendered in full; answering its short form", r.run_id)
        return rp.Run(
            run_id=r.run_id,
            workspace_id=r.workspace_id,
            state=_STATE[r.state],
            data=struct_pb2.Value(string_value=OMITTED),
            create_time=_time(r.created_at),
            update_time=_time(r.updated_at),
            task=shown(r.task, 1000),
            last_seq=r.last_seq,
            thread_id=r.thread,
        )


def _run_to_proto(r: RunRecord) -> rp.Run:
    pause = None
    if r.state is RunState.PAUSED and r.pause_reason is not None:
        pause = rp.Pause(
            reason=_REASON[r.pause_reason.value], interrupts=[interrupt_to_proto(i) for i in r.interrupts]
        )
    return rp.Run(
        run_id=r.run_id,
        workspace_id=r.workspace_id,
        state=_STATE[r.state],
        pause=pause,
        data=_value(r.data),
        error=_error(r.error),
        meta=_meta(r.meta),
        create_time=_time(r.created_at),
        update_time=_time(r.updated_at),
        task=r.task,
        last_seq=r.last_seq,
        queue_position=r.queue_position,
        thread_id=r.thread,
    )


def thread_to_proto(t: Thread) -> rp.Thread:
    forked = None
    if t.forked_from is not None:
        forked = rp.ForkSource(run_id=t.forked_from.get("run_id", ""))
        if t.forked_from.get("turn"):
            forked.turn = int(t.forked_from["turn"])
        elif t.forked_from.get("seq"):
            forked.seq = int(t.forked_from["seq"])
    return rp.Thread(
        thread_id=t.thread_id,
        workspace_id=t.workspace_id,
        labels=t.labels,
        run_ids=t.run_ids,
        active_run_id=t.active_run_id,
        forked_from=forked,
        create_time=_time(t.created_at),
        update_time=_time(t.updated_at),
    )


def _call(doc: JsonObject) -> ev.ToolCall:
    return ev.ToolCall(call_id=doc["id"], tool_name=doc["name"], arguments=_struct(doc["args"]))


def _interrupt_raised(d: JsonObject) -> ev.InterruptRaised:
    return ev.InterruptRaised(interrupt=interrupt_to_proto(Interrupt.from_json(d["interrupt"])))


def _payload(kind: EventKind, d: JsonObject) -> Any:
    if kind is EventKind.RUN_STARTED:
        return ev.RunStarted(task=d["task"], model=d["model"])
    if kind is EventKind.ASSISTANT_MESSAGE:
        return ev.AssistantMessage(text=d["text"], tool_calls=[_call(c) for c in d["calls"]], turn=d["turn"])
    if kind is EventKind.TOOL_CALL_STARTED:
        return ev.ToolCallStarted(call=_call(d["call"]))
    if kind is EventKind.TOOL_CALL_COMPLETED:
        return ev.ToolCallCompleted(
            call_id=d["call_id"],
            tool_name=d["tool"],
            is_error=d["is_error"],
            size_bytes=d["size"],
            output=d["output"],
            duration_ms=d["duration_ms"],
            outcome=d.get("outcome", "ran"),
        )
    if kind in (EventKind.APPROVAL_REQUESTED, EventKind.INPUT_REQUESTED, EventKind.TOOL_RESULT_REQUESTED):
        return _interrupt_raised(d)
    if kind is EventKind.APPROVAL_DECIDED:
        return ev.InterruptDecided(
            interrupt_id=d["interrupt_id"],
            decision=d["decision"],
            decided_by=d["by"],
            decide_time=_time(d["at"]),
            arguments_sha256=d["sha256"],
            expired=d["expired"],
            reason=d["reason"],
        )
    if kind is EventKind.PAUSED:
        return ev.Paused(
            pause=rp.Pause(
                reason=_REASON[d["reason"]],
                interrupts=[interrupt_to_proto(Interrupt.from_json(i)) for i in d["interrupts"]],
            )
        )
    if kind is EventKind.RESUMED:
        return ev.Resumed(resumed_by=d["by"], rolled_back_from_seq=d.get("rolled_back_from", 0))
    if kind is EventKind.USAGE:
        return ev.UsageReported(
            turn=d["turn"], usage=_usage(Usage.from_json(d["usage"])), cost_usd=d["cost_usd"]
        )
    if kind is EventKind.CONTEXT_COMPACTED:
        return ev.ContextCompacted(
            turn=d["turn"],
            turns_summarized=d["turns_summarized"],
            tokens_before=d["tokens_before"],
            tokens_after=d["tokens_after"],
            usage=_usage(Usage.from_json(d["usage"])),
            cost_usd=d["cost_usd"],
        )
    if kind is EventKind.API_CALL:
        return ev.ApiCallMetered(**d)
    if kind is EventKind.HANDOFF_TO_RUNNER:
        return ev.HandoffToRunner(tools=d["tools"])
    if kind is EventKind.RUN_FINISHED:
        error = d.get("error")
        return ev.RunFinished(
            state=_STATE[RunState(d["state"])],
            data=_value(d.get("data")),
            error=_error(RunError.from_json(error) if error else None),
            meta=_meta(RunMeta.from_json(d["meta"])),
        )
    if kind is EventKind.AGENT_STARTED:
        return ev.AgentStarted(**d)
    if kind is EventKind.AGENT_FINISHED:
        error = d.get("error")
        return ev.AgentFinished(
            state=_AGENT_STATE[d["state"]],
            output=d["output"],
            error=_error(RunError.from_json(error) if error else None),
            meta=_meta(RunMeta.from_json(d["meta"])),
        )
    raise ValueError(f"no conversion for event kind {kind}")


_AGENT_STATE = {
    AgentState.RUNNING.value: rp.RUN_STATE_RUNNING,
    AgentState.DONE.value: rp.RUN_STATE_DONE,
    AgentState.FAILED.value: rp.RUN_STATE_FAILED,
    AgentState.CANCELLED.value: rp.RUN_STATE_CANCELLED,
}

# Events per response message stay under this many bytes (a single larger event still goes, alone):
# a whole stream batch of large events (tool results) would pass the 4 MiB gRPC message limit.
MAX_EVENTS_BYTES = 1 << 20
# An upper bound of a RunEvent's bytes besides its run_id and payload (tags, lengths, seq, time),
# and of a TextDelta's besides its text.
_EVENT_OVERHEAD = 64
_DELTA_OVERHEAD = 24


def add_events(
    events: Any, run_id: str, batch: list[Event], start: int = 0, max_bytes: int = MAX_EVENTS_BYTES
) -> int:
    """Append ``batch[start:]`` to a repeated RunEvent field, building each message in place.

    Each event becomes a RunEvent (``run_id``, ``seq``, ``time`` and its kind's payload), about 3×
    cheaper than building that message and copying it in: nothing intermediate is copied, and
    text deltas (most of a stream) are filled field by field, one message per seq of an event
    that covers several. Every assignment marks presence, so defaults still set the oneof and
    ``time``.

    Stops before the messages added would pass ``max_bytes`` serialized (the first one always
    goes) and returns the index of the first event not added: ``len(batch)`` when all were. When
    it stops inside an event of several text deltas, ``batch`` at that index becomes the rest of
    it. Sizes cost O(1) per text delta (4 bytes per character bound its UTF-8); other events are
    measured.
    """
    add = events.add
    overhead = _EVENT_OVERHEAD + len(run_id)
    delta_overhead = overhead + _DELTA_OVERHEAD
    first = len(events)
    used = 0
    for index in range(start, len(batch)):
        event = batch[index]
        kind, data = event.kind, event.data
        t = event.time
        seconds = int(t)
        nanos = int((t - seconds) * 1e9)
        if kind is EventKind.TEXT_DELTA:
            turn = data["turn"]
            seq = event.seq
            path = event.agent_path
            texts = data["texts"]
            # Several deltas: each message starts as a copy of what they share (parsed in C).
            shared = _delta_template(run_id, seconds, nanos, turn, path) if len(texts) > 2 else b""
            if shared:
                size = len(texts) * (delta_overhead + len(path)) + 4 * sum(map(len, texts))
                if used + size <= max_bytes:
                    used += size  # all of them fit: no size to check per delta
                    for number, text in enumerate(texts, seq):
                        message = add(seq=number)
                        message.MergeFromString(shared)
                        message.text_delta.text = text
                    continue
            for text in texts:
                used += delta_overhead + len(path) + 4 * len(text)
                if used > max_bytes and len(events) > first:
                    if seq > event.seq:
                        batch[index] = event.after(seq - 1)
                    return index
                message = add(seq=seq)
                if shared:
                    message.MergeFromString(shared)
                    message.text_delta.text = text
                else:
                    message.run_id = run_id
                    if path:
                        message.agent_path = path
                    stamp = message.time
                    stamp.seconds = seconds
                    stamp.nanos = nanos
                    delta = message.text_delta
                    delta.text = text
                    delta.turn = turn
                seq += 1
            continue
        payload = _payload(kind, data)
        used += overhead + payload.ByteSize()
        if used > max_bytes and len(events) > first:
            return index
        message = add(run_id=run_id, seq=event.seq)
        if event.agent_path:
            message.agent_path = event.agent_path
        stamp = message.time
        stamp.seconds = seconds
        stamp.nanos = nanos
        getattr(message, kind).CopyFrom(payload)
    return len(batch)


def _delta_template(run_id: str, seconds: int, nanos: int, turn: int, path: str) -> bytes:
    """A RunEvent holding what the text deltas of one event share (all but seq and text), serialized."""
    message = ev.RunEvent(run_id=run_id, agent_path=path)
    message.time.seconds = seconds
    message.time.nanos = nanos
    message.text_delta.turn = turn
    return message.SerializeToString()


_Response = TypeVar("_Response", svc.ExecuteRunResponse, svc.StreamRunEventsResponse)


def event_responses(
    response_type: type[_Response], run_id: str, batch: Sequence[Event]
) -> Iterator[_Response]:
    """``batch`` in as many responses as `add_events` needs to keep each under ``MAX_EVENTS_BYTES``."""
    pending = list(batch)  # add_events may replace an event it split between two responses
    start = 0
    while start < len(pending):
        response = response_type()
        start = add_events(response.events, run_id, pending, start)
        yield response

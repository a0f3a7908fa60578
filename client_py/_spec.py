"""Building request protos (RunSpec, Decision) from plain Python arguments.

Obvious mistakes (a misspelt enum string, a negative limit, a string where a list
of tool names belongs) are caught here with a ``ValueError``/``TypeError`` that
names the argument, before a round trip to the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from google.protobuf import json_format

from client_py._errors import InvalidArgumentError, InvalidRequestError, refused
from client_py._json import dict_to_struct, python_to_value
from machina.engine.v1 import engine_service_pb2 as pb
from machina.engine.v1 import run_pb2

__all__ = [
    "Approve",
    "Decision",
    "DecisionLike",
    "Reject",
    "Respond",
    "RunOptions",
    "build_run_spec",
    "decision_to_proto",
    "states_to_proto",
]


class RunOptions(TypedDict, total=False):
    """Keyword arguments of ``execute``/``create`` besides ``task``; ``None`` = the engine's default.

    - ``model``: a model name (``"gpt-4o"``, ``"claude-sonnet-4-5"``: the engine infers the
      provider from well-known prefixes, else it is the default provider's model), a provider
      (``"scripted"``, ``"openai"``, ``"anthropic"``: its default model), or ``"provider:name"``
      (e.g. ``"openai:llama-3.1-8b"`` for a model an OpenAI-compatible server serves).
    - ``model_name``: the model, with ``model`` naming the provider.
    - ``script``: turns for the scripted model, each a dict
      ``{"text": str, "tool_calls": [{"name": str, "arguments": dict}],
      "usage": {"input_tokens": int, "output_tokens": int, "cache_read_tokens": int,
      "cache_write_tokens": int}}`` (all keys optional) or
      just the text as a string. Implies ``model="scripted"``.
    - ``agent_scripts``: for the scripted model, the turns each subagent (``Agent`` tool)
      replays, by its path (``{"call_1_1": [turns...]}``, turns as for ``script``).
    - ``context_window_tokens``: the model's context window for this run; past the engine's
      ``compact_at`` share of it, older turns are summarised (``ContextCompacted`` events).
    - ``timeout`` / ``approval_timeout``: seconds.
    - ``tools``: the allowed tool names; ``[]`` means no tools at all, ``None`` all.
    - ``permissions``: tool name -> ``"allow"``, ``"ask"`` or ``"deny"``.
    - ``tool_choice``: ``"auto"``, ``"required"`` or ``"none"``.
    - ``approval_expiry_action``: ``"approve"`` or ``"reject"``.
    - ``client_tools``: tools the caller defines and answers itself, each
      ``{"name": str, "description": str, "input_schema": dict}``; a call pauses
      the run (``AWAITING_TOOL_RESULT``) until you ``respond`` with the result.
    - ``api``: per-run ApiCall services and credentials, shaped like the ``ApiSpec``
      message: ``{"services": [{"name", "base_url", "auth": {"type": "bearer",
      "token_ref": "t"}, ...}], "env": {"t": "<secret>"}}``. The engine keeps ``env``
      in memory only.
    - ``mcp_servers``: only these configured MCP servers' tools (``[]`` = none).
    - ``sandbox_network``: ``False`` keeps this run's Bash off the network even where the
      engine allows it (``True`` only where it does; a run can only narrow the sandbox).
    - ``webhook``: ``{"url", "secret_ref", "events": ["paused", "done", "failed"], "headers"}``;
      the engine POSTs the run there, signed with the secret ``secret_ref`` names.
    - ``thread_id``: continue this thread (the model sees its history, then ``task``); a new id
      starts a new thread. A run's own id names the thread it started.
    - ``fork_from``: start a new thread from another run's history: a run id (all of it so far)
      or ``{"run_id": ..., "turn": n}`` / ``{"run_id": ..., "seq": n}``.
    """

    run_id: str | None
    request_id: str | None
    model: str | None
    model_name: str | None
    script: Sequence[Mapping[str, Any] | str] | None
    agent_scripts: Mapping[str, Sequence[Mapping[str, Any] | str]] | None
    max_output_tokens: int | None
    context_window_tokens: int | None
    max_turns: int | None
    max_tokens: int | None
    timeout: float | None
    max_cost_usd: float | None
    tool_choice: str | None
    tools: Sequence[str] | None
    permissions: Mapping[str, str] | None
    gated_tools: Sequence[str] | None
    output_schema: Mapping[str, Any] | None
    system_prompt: str | None
    approval_timeout: float | None
    approval_expiry_action: str | None
    labels: Mapping[str, str] | None
    client_tools: Sequence[Mapping[str, Any]] | None
    api: Mapping[str, Any] | None
    mcp_servers: Sequence[str] | None
    sandbox_network: bool | None
    webhook: Mapping[str, Any] | None
    thread_id: str | None
    fork_from: str | Mapping[str, Any] | None


_OPTION_NAMES = frozenset(RunOptions.__annotations__)

_TOOL_CHOICES = {
    "auto": run_pb2.TOOL_CHOICE_AUTO,
    "required": run_pb2.TOOL_CHOICE_REQUIRED,
    "none": run_pb2.TOOL_CHOICE_NONE,
}
_PERMISSIONS = {
    "allow": run_pb2.PERMISSION_ALLOW,
    "ask": run_pb2.PERMISSION_ASK,
    "deny": run_pb2.PERMISSION_DENY,
}
_EXPIRY_ACTIONS = {
    "approve": run_pb2.EXPIRY_ACTION_APPROVE,
    "reject": run_pb2.EXPIRY_ACTION_REJECT,
}
_SCRIPT_TURN_KEYS = frozenset({"text", "tool_calls", "usage"})
_SCRIPT_CALL_KEYS = frozenset({"name", "arguments"})
_USAGE_KEYS = frozenset({"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"})


# The engine's model providers; anything else given as `model=` is taken as a model name.
_PROVIDERS = frozenset({"scripted", "openai", "anthropic"})


def _refuse(message: str) -> InvalidArgumentError:
    return refused("ERR_INVALID_REQUEST", message)


def _choice(name: str, value: str, choices: Mapping[str, Any]) -> Any:
    if not isinstance(value, str) or value.lower() not in choices:
        raise _refuse(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return choices[value.lower()]


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _refuse(f"{name} must be a str, got {type(value).__name__}")
    return value


def _names(name: str, value: Any) -> list[str]:
    # A bare string is iterable too, and would silently become one tool per letter.
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | set | frozenset):
        raise _refuse(f"{name} must be a list of tool names, got {type(value).__name__}")
    return [_str(f"{name}[]", item) for item in value]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise _refuse(f"{name} must be > 0, got {value}")
    return value


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise _refuse(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _millis(name: str, seconds: Any) -> int:
    # 0 means "none" on the wire, so a tiny positive timeout must not round down to it.
    return max(1, round(_positive_number(name, seconds) * 1000))


def _known_keys(where: str, mapping: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(mapping, Mapping):
        raise _refuse(f"{where} must be a dict, got {type(mapping).__name__}")
    unknown = set(mapping) - allowed
    if unknown:
        raise _refuse(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return mapping


def _script_turn(index: int, turn: Mapping[str, Any] | str, out: pb.ScriptedTurn) -> None:
    where = f"script[{index}]"
    if isinstance(turn, str):
        out.text = turn
        return
    turn = _known_keys(where, turn, _SCRIPT_TURN_KEYS)
    out.text = _str(f"{where}.text", turn.get("text", ""))
    calls = turn.get("tool_calls") or []
    if isinstance(calls, Mapping) or not isinstance(calls, Sequence):
        raise _refuse(f"{where}.tool_calls must be a list of dicts")
    for j, call in enumerate(calls):
        call_where = f"{where}.tool_calls[{j}]"
        call = _known_keys(call_where, call, _SCRIPT_CALL_KEYS)
        if "name" not in call:
            raise _refuse(f"{call_where} needs a 'name'")
        proto_call = out.tool_calls.add(name=_str(f"{call_where}.name", call["name"]))
        dict_to_struct(call.get("arguments") or {}, proto_call.arguments, where=f"{call_where}.arguments")
    if "usage" in turn:
        usage = _known_keys(f"{where}.usage", turn["usage"], _USAGE_KEYS)
        out.usage.input_tokens = int(usage.get("input_tokens", 0))
        out.usage.output_tokens = int(usage.get("output_tokens", 0))
        out.usage.cache_read_tokens = int(usage.get("cache_read_tokens", 0))
        out.usage.cache_write_tokens = int(usage.get("cache_write_tokens", 0))


def _model(spec: pb.RunSpec, options: RunOptions) -> None:
    provider = options.get("model")
    name = options.get("model_name")
    script = options.get("script")
    if provider is not None:
        provider = _str("model", provider)
        if ":" in provider and name is None:
            provider, name = provider.split(":", 1)
        elif provider.lower() in _PROVIDERS:
            provider = provider.lower()
        elif name is None:
            # A bare model name: the engine infers its provider ("gpt-4o" → openai).
            provider, name = None, provider
    if script is not None:
        if provider not in (None, "scripted"):
            raise refused("ERR_INVALID_SCRIPT", f"script needs the scripted model, but model={provider!r}")
        provider = "scripted"
        if isinstance(script, str | Mapping) or not isinstance(script, Sequence):
            raise refused("ERR_INVALID_SCRIPT", "script must be a list of turns (dicts or strings)")
        try:
            for index, turn in enumerate(script):
                _script_turn(index, turn, spec.model.script.add())
        except InvalidRequestError as exc:
            raise refused("ERR_INVALID_SCRIPT", exc.message) from None
    agent_scripts = options.get("agent_scripts")
    if agent_scripts is not None:
        if not isinstance(agent_scripts, Mapping):
            raise refused("ERR_INVALID_SCRIPT", "agent_scripts must map agent paths to lists of turns")
        try:
            for path, turns in agent_scripts.items():
                if isinstance(turns, str | Mapping) or not isinstance(turns, Sequence):
                    raise refused("ERR_INVALID_SCRIPT", f"agent_scripts[{path!r}] must be a list of turns")
                entry = spec.model.agent_scripts.add(agent_path=_str("agent_scripts", path))
                for index, turn in enumerate(turns):
                    _script_turn(index, turn, entry.script.add())
        except InvalidRequestError as exc:
            raise refused("ERR_INVALID_SCRIPT", exc.message) from None
    if provider is not None:
        spec.model.provider = provider
    if name is not None:
        spec.model.name = _str("model_name", name)
    if options.get("max_output_tokens") is not None:
        spec.model.max_output_tokens = _positive_int("max_output_tokens", options.get("max_output_tokens"))
    if options.get("context_window_tokens") is not None:
        spec.model.context_window_tokens = _positive_int(
            "context_window_tokens", options.get("context_window_tokens")
        )


def _limits(spec: pb.RunSpec, options: RunOptions) -> None:
    if (max_turns := options.get("max_turns")) is not None:
        spec.limits.max_turns = _positive_int("max_turns", max_turns)
    if (max_tokens := options.get("max_tokens")) is not None:
        spec.limits.max_tokens = _positive_int("max_tokens", max_tokens)
    if (timeout := options.get("timeout")) is not None:
        spec.limits.timeout_ms = _millis("timeout", timeout)
    if (max_cost := options.get("max_cost_usd")) is not None:
        spec.limits.max_cost_usd = _positive_number("max_cost_usd", max_cost)


def _fork_from(spec: pb.RunSpec, fork_from: str | Mapping[str, Any]) -> None:
    if isinstance(fork_from, str):
        spec.fork_from.run_id = fork_from
        return
    if not isinstance(fork_from, Mapping):
        raise _refuse("fork_from must be a run id or a dict like {'run_id': ..., 'turn': 1}")
    fields = _known_keys("fork_from", fork_from, frozenset({"run_id", "turn", "seq"}))
    spec.fork_from.run_id = _str("fork_from.run_id", fields.get("run_id"))
    if fields.get("turn") is not None and fields.get("seq") is not None:
        raise _refuse("fork_from takes a turn or a seq, not both")
    if fields.get("turn") is not None:
        spec.fork_from.turn = _positive_int("fork_from.turn", fields["turn"])
    if fields.get("seq") is not None:
        spec.fork_from.seq = _positive_int("fork_from.seq", fields["seq"])


def build_run_spec(task: str, **options: Unpack[RunOptions]) -> pb.RunSpec:
    """Returns the ``RunSpec`` for ``task``; see ``RunOptions`` for the options."""
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        # A misspelt keyword argument is a TypeError, as for any Python function.
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; allowed: {sorted(_OPTION_NAMES)}")
    spec = pb.RunSpec(task=_str("task", task))
    if (run_id := options.get("run_id")) is not None:
        spec.run_id = _str("run_id", run_id)
    if (request_id := options.get("request_id")) is not None:
        spec.request_id = _str("request_id", request_id)
    if (thread_id := options.get("thread_id")) is not None:
        spec.thread_id = _str("thread_id", thread_id)
    if (fork_from := options.get("fork_from")) is not None:
        _fork_from(spec, fork_from)
    _model(spec, options)
    _limits(spec, options)
    if (tool_choice := options.get("tool_choice")) is not None:
        spec.tool_choice = _choice("tool_choice", tool_choice, _TOOL_CHOICES)
    if (tools := options.get("tools")) is not None:
        # Presence is the signal: an empty but present list means "no tools".
        spec.tools.SetInParent()
        spec.tools.names.extend(_names("tools", tools))
    if (permissions := options.get("permissions")) is not None:
        if not isinstance(permissions, Mapping):
            raise _refuse("permissions must be a dict of tool name -> 'allow' | 'ask' | 'deny'")
        for tool, permission in permissions.items():
            spec.permissions[_str("permissions key", tool)] = _choice(
                f"permissions[{tool!r}]", permission, _PERMISSIONS
            )
    if (gated := options.get("gated_tools")) is not None:
        spec.gated_tools.extend(_names("gated_tools", gated))
    if (schema := options.get("output_schema")) is not None:
        dict_to_struct(schema, spec.output_schema, where="output_schema")
    if (system_prompt := options.get("system_prompt")) is not None:
        spec.system_prompt = _str("system_prompt", system_prompt)
    if (approval_timeout := options.get("approval_timeout")) is not None:
        spec.approval_timeout_ms = _millis("approval_timeout", approval_timeout)
    if (expiry := options.get("approval_expiry_action")) is not None:
        spec.approval_expiry_action = _choice("approval_expiry_action", expiry, _EXPIRY_ACTIONS)
    if (labels := options.get("labels")) is not None:
        if not isinstance(labels, Mapping):
            raise _refuse("labels must be a dict of str -> str")
        for key, value in labels.items():
            spec.labels[_str("labels key", key)] = _str(f"labels[{key!r}]", value)
    if (mcp_servers := options.get("mcp_servers")) is not None:
        spec.mcp_servers.SetInParent()
        spec.mcp_servers.servers.extend(_names("mcp_servers", mcp_servers))
    if (sandbox_network := options.get("sandbox_network")) is not None:
        if not isinstance(sandbox_network, bool):
            raise TypeError("sandbox_network must be True or False")
        spec.sandbox_network = sandbox_network
    if (webhook := options.get("webhook")) is not None:
        if not isinstance(webhook, Mapping):
            raise _refuse("webhook must be a dict like {'url': ..., 'secret_ref': ..., 'events': [...]}")
        try:
            json_format.ParseDict(dict(webhook), spec.webhook)
        except json_format.ParseError as exc:
            raise _refuse(f"invalid webhook: {exc}") from None
    if (api := options.get("api")) is not None:
        api_spec_into(api, spec.api)
    for index, client_tool in enumerate(options.get("client_tools") or ()):
        fields = _known_keys(
            f"client_tools[{index}]", client_tool, frozenset({"name", "description", "input_schema"})
        )
        definition = spec.client_tools.add(
            name=_str(f"client_tools[{index}].name", fields.get("name")),
            description=_str(f"client_tools[{index}].description", fields.get("description", "")),
        )
        if (schema := fields.get("input_schema")) is not None:
            dict_to_struct(schema, definition.input_schema, where=f"client_tools[{index}].input_schema")
    return spec


def api_spec_into(api: Mapping[str, Any], out: pb.ApiSpec) -> None:
    """Fill an ApiSpec message from its dict form (the message's field names)."""
    if not isinstance(api, Mapping):
        raise _refuse("api must be a dict like {'services': [...], 'env': {...}}")
    try:
        json_format.ParseDict(dict(api), out)
    except json_format.ParseError as exc:
        raise _refuse(f"invalid api spec: {exc}") from None


# --- decisions --------------------------------------------------------------------


@dataclass(frozen=True)
class Approve:
    """Approve a tool call; ``edits`` (if given) replaces the proposed arguments."""

    interrupt_id: str
    edits: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Reject:
    """Reject a tool call; the model sees ``reason`` as an error result."""

    interrupt_id: str
    reason: str = ""


@dataclass(frozen=True)
class Respond:
    """Supply the tool result or the answer to a question (any JSON value)."""

    interrupt_id: str
    output: Any


Decision = Approve | Reject | Respond
# The dict forms, for callers that build decisions from JSON:
#   {"interrupt_id": "...", "action": "approve" | "reject" | "respond",
#    plus "edits" (approve), "reason" (reject) or "output" (respond)}
# or, mirroring the proto's oneof, exactly one of the action names as a key:
#   {"interrupt_id": "...", "approve": True, "edits": {...}}
#   {"interrupt_id": "...", "reject": True, "reason": "..."}
#   {"interrupt_id": "...", "respond": <output>}
DecisionLike = Approve | Reject | Respond | Mapping[str, Any]

_EXTRA_KEY = {"approve": "edits", "reject": "reason", "respond": "output"}


def _decision_action(raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Returns the action and the decision's fields in the "action" form."""
    if "action" in raw:
        action = _choice("decision action", raw["action"], _EXTRA_KEY)
        name = str(raw["action"]).lower()
        _known_keys(f"{name} decision", raw, frozenset({"interrupt_id", "action", action}))
        return name, {k: v for k, v in raw.items() if k != "action"}
    named = [name for name in _EXTRA_KEY if name in raw]
    if len(named) != 1:
        raise _refuse(
            "a decision dict needs 'action' ('approve', 'reject' or 'respond') "
            f"or exactly one of those as a key, got keys {sorted(raw)}"
        )
    name = named[0]
    fields = {k: v for k, v in raw.items() if k != name}
    if name == "respond":
        _known_keys("respond decision", raw, frozenset({"interrupt_id", "respond"}))
        fields["output"] = raw["respond"]
    else:
        _known_keys(f"{name} decision", raw, frozenset({"interrupt_id", name, _EXTRA_KEY[name]}))
        if raw[name] is not True:
            raise _refuse(f"{name!r} must be True in a decision dict, got {raw[name]!r}")
    return name, fields


def _decision_from_dict(raw: Mapping[str, Any]) -> Decision:
    if not isinstance(raw, Mapping):
        raise _refuse(f"not a decision: {raw!r}")
    action, fields = _decision_action(raw)
    if "interrupt_id" not in fields:
        raise _refuse("a decision needs an 'interrupt_id'")
    interrupt_id = _str("interrupt_id", fields["interrupt_id"])
    match action:
        case "approve":
            return Approve(interrupt_id, fields.get("edits"))
        case "reject":
            return Reject(interrupt_id, _str("reason", fields.get("reason", "")))
        case _:
            if "output" not in fields:
                raise _refuse("a respond decision needs an 'output'")
            return Respond(interrupt_id, fields["output"])


def decision_to_proto(decision: DecisionLike) -> pb.Decision:
    try:
        return _decision_to_proto(decision)
    except InvalidRequestError as exc:
        raise refused("ERR_INVALID_DECISION", exc.message) from None


def _decision_to_proto(decision: DecisionLike) -> pb.Decision:
    if isinstance(decision, Mapping):
        decision = _decision_from_dict(decision)
    proto = pb.Decision(interrupt_id=_str("interrupt_id", decision.interrupt_id))
    match decision:
        case Approve(edits=edits):
            proto.approve.SetInParent()
            if edits is not None:
                dict_to_struct(edits, proto.approve.edited_arguments, where="edits")
        case Reject(reason=reason):
            proto.reject.reason = _str("reason", reason)
            proto.reject.SetInParent()
        case Respond(output=output):
            python_to_value(output, proto.respond.output, where="output")
        case _:
            raise _refuse(f"not a decision: {decision!r}")
    return proto


def states_to_proto(states: Sequence[str] | None) -> list[run_pb2.RunState.ValueType]:
    result: list[run_pb2.RunState.ValueType] = []
    for state in _names("states", states) if states is not None else []:
        try:
            result.append(run_pb2.RunState.Value(f"RUN_STATE_{state.upper()}"))
        except ValueError:
            raise _refuse(
                f"unknown run state {state!r}; use QUEUED, RUNNING, PAUSED, DONE, FAILED or CANCELLED"
            ) from None
    return result

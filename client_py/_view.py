"""A pure-Python view model of one run: what the notebook widgets show and do.

``RunViewModel`` folds a run's events (and Run snapshots) into plain attributes —
state, streamed text, a tool-call log, counters, the handoff, and one
``CardModel`` per pending interrupt with its approve / reject / respond actions.
It imports no widget library, so tests drive it directly and ``client_py.widgets``
stays a thin layer of stock ipywidgets over it.

Two rules keep it consistent however events and snapshots interleave:

* Every event is applied once: an event whose ``seq`` is not above ``last_seq``
  is ignored, so re-reading a stream from seq 0 (after a kernel restart, or a
  reconnect) never repeats text or log lines.
* State-like fields (state, pause, pending cards, counters, result) follow the
  newest information by seq: a snapshot older than what the events already showed
  is ignored, and an event older than the last snapshot only adds to the logs.

``Watcher`` feeds a model from a sync ``RunHandle``: it runs as a task on the
sync client's own event-loop thread (the one every ``EngineClient`` call already
goes through), so it never touches the kernel's loop, and ``stop()`` cancels the
stream cleanly. Listeners, and so widget updates, run on whichever thread changed
the model (that loop thread for events, the caller's for decisions), one at a
time under the model's lock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, Self

from client_py import _render
from client_py._errors import MachinaError, refused
from client_py._types import (
    TERMINAL_STATES,
    AgentFinished,
    AgentStarted,
    ApiCallMetered,
    ApprovalDecided,
    AssistantMessage,
    ContextCompacted,
    HandoffToRunner,
    Interrupt,
    Paused,
    Resumed,
    Run,
    RunError,
    RunEvent,
    RunFinished,
    RunMeta,
    RunStarted,
    TextDelta,
    ToolCallCompleted,
    ToolCallStarted,
    UsageReported,
    _InterruptRaised,
)

if TYPE_CHECKING:
    from client_py._sync import RunHandle

__all__ = [
    "CARDS",
    "NOTES",
    "STATUS",
    "TEXT",
    "TOOLS",
    "Actions",
    "CardModel",
    "RunViewModel",
    "ToolLogEntry",
    "Watcher",
    "validate_json",
]

log = logging.getLogger("client_py.view")

# What changed, passed to listeners so a view redraws only that part.
STATUS = "status"  # state, pause reason, counters, result/error, handoff, watcher
TEXT = "text"  # model text (only ever appended to)
TOOLS = "tools"  # the tool-call log
CARDS = "cards"  # pending interrupts and their cards' busy/message state
NOTES = "notes"  # the lifecycle timeline
ALL = frozenset({STATUS, TEXT, TOOLS, CARDS, NOTES})

Listener = Callable[["RunViewModel", frozenset[str]], None]

# Which decisions each interrupt kind accepts (the engine refuses the others).
_ACTIONS: dict[str, tuple[str, ...]] = {
    "APPROVAL": ("approve", "reject", "respond"),
    "TOOL_RESULT": ("respond",),
    "INPUT": ("respond",),
}
_AWAITING = {"APPROVAL": "awaiting approval", "TOOL_RESULT": "awaiting result", "INPUT": "awaiting answer"}
_DECIDED = {
    "approve": "approved",
    "approve_with_edits": "approved with edits",
    "reject": "rejected",
    "respond": "responded",
}


class Actions(Protocol):
    """What cards call to decide; a sync ``RunHandle`` is one."""

    def approve(self, interrupt_id: str, edits: Mapping[str, Any] | None = None) -> Run: ...

    def reject(self, interrupt_id: str, reason: str = "") -> Run: ...

    def respond(self, interrupt_id: str, output: Any) -> Run: ...


# --- a small JSON Schema check for edited arguments -------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _has_type(value: Any, name: str) -> bool:
    actual = _json_type(value)
    if name == "number":
        return actual in ("integer", "number")
    if name == "integer":
        return actual == "integer" or (actual == "number" and float(value).is_integer())
    if name in ("null", "boolean", "string", "array", "object"):
        return actual == name
    return True  # a type this check does not know: the engine decides


def _resolve(schema: Any, root: Mapping[str, Any]) -> Any:
    ref = schema.get("$ref") if isinstance(schema, Mapping) else None
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    node: Any = root
    for part in ref[2:].split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return {}  # an unresolvable ref: nothing to check here
        node = node[part]
    return node


def _matches(pattern: str, value: str) -> bool:
    """JSON Schema's ``pattern``: a search, not anchored. A pattern Python cannot compile (or one
    too slow to try on a long value) is left to the engine, which has the last word."""
    if len(value) > 10_000:
        return True
    try:
        return re.search(pattern, value) is not None
    except re.error:
        return True


def _check(value: Any, schema: Any, root: Mapping[str, Any], path: str, depth: int = 0) -> list[str]:
    schema = _resolve(schema, root)
    if not isinstance(schema, Mapping) or depth > 32:
        return []
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    if isinstance(types, list) and types and not any(_has_type(value, str(t)) for t in types):
        return [f"{path}: expected {' or '.join(map(str, types))}, got {_json_type(value)}"]
    errors: list[str] = []
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        errors.append(f"{path}: must be one of {json.dumps(schema['enum'], ensure_ascii=False)}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {json.dumps(schema['const'], ensure_ascii=False)}")
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if (
            isinstance(branches, list)
            and branches
            and all(_check(value, b, root, path, depth + 1) for b in branches)
        ):
            errors.append(f"{path}: matches none of the allowed shapes")
    for branch in schema.get("allOf") or []:
        errors += _check(value, branch, root, path, depth + 1)
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and not _matches(pattern, value):
            errors.append(f"{path}: does not match the pattern {pattern!r}")
    if _json_type(value) in ("integer", "number"):
        if isinstance(schema.get("minimum"), int | float) and value < schema["minimum"]:
            errors.append(f"{path}: must be ≥ {schema['minimum']}")
        if isinstance(schema.get("maximum"), int | float) and value > schema["maximum"]:
            errors.append(f"{path}: must be ≤ {schema['maximum']}")
        if isinstance(schema.get("exclusiveMinimum"), int | float) and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: must be > {schema['exclusiveMinimum']}")
        if isinstance(schema.get("exclusiveMaximum"), int | float) and value >= schema["exclusiveMaximum"]:
            errors.append(f"{path}: must be < {schema['exclusiveMaximum']}")
    if isinstance(value, dict):
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        errors += [
            f"{path}: missing required key {key!r}"
            for key in schema.get("required") or []
            if isinstance(key, str) and key not in value
        ]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += _check(item, properties[key], root, f"{path}.{key}", depth + 1)
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, Mapping):
                errors += _check(item, extra, root, f"{path}.{key}", depth + 1)
    if isinstance(value, list):
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            errors += _check(item, schema["items"], root, f"{path}[{index}]", depth + 1)
    return errors


def validate_json(value: Any, schema: Mapping[str, Any] | None) -> list[str]:
    """Problems of ``value`` against a JSON Schema, as readable lines (empty = fine).

    A deliberately small subset — types, required and unexpected keys, enum/const,
    anyOf/oneOf/allOf, local ``$ref``, string lengths and patterns, number bounds and
    array lengths — enough to
    catch a typo before sending; the engine validates edits fully and has the
    last word (``InvalidEditsError``).
    """
    if not schema:
        return []
    return _check(value, schema, schema, "$")


# --- the model --------------------------------------------------------------------


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


@dataclass
class ToolLogEntry:
    """One tool call of the run, as the log shows it."""

    call_id: str
    tool_name: str
    arguments: dict[str, Any]
    status: str  # awaiting approval/result/answer, approved…, running, ok, error, rejected, responded
    output: str = ""
    duration_ms: int = 0
    decision: str = ""  # how a person decided it, if it needed one
    decided_by: str = ""
    agent_path: str = ""  # the subagent that made the call ("" = the run's own agent)


class CardModel:
    """One pending interrupt and what a person can do about it.

    ``arguments_text``, ``reason_text`` and ``response_text`` are what the person
    typed (the widget keeps them in sync). ``approve()``, ``reject()`` and
    ``respond()`` check the input first — an invalid edit is never sent — then call
    the engine; while that call is in flight ``busy`` is true and every action is
    refused. Each returns True when the engine accepted the decision; otherwise
    ``message`` says why not.
    """

    def __init__(self, model: RunViewModel, interrupt: Interrupt) -> None:
        self._model = model
        self.interrupt = interrupt
        self.arguments_text = json.dumps(interrupt.arguments, indent=2, ensure_ascii=False)
        self.reason_text = ""
        self.response_text = ""
        self.busy = False
        self.message = ""
        self.decision: str | None = None  # what this card sent, once accepted

    def __repr__(self) -> str:
        flags = " busy" if self.busy else ""
        decided = f" decided={self.decision!r}" if self.decision else ""
        return f"CardModel({self.interrupt_id!r}, {self.kind} {self.tool_name!r}{flags}{decided})"

    @property
    def interrupt_id(self) -> str:
        return self.interrupt.interrupt_id

    @property
    def kind(self) -> str:
        return self.interrupt.kind

    @property
    def tool_name(self) -> str:
        return self.interrupt.tool_name

    @property
    def actions(self) -> tuple[str, ...]:
        """The decisions this interrupt accepts: ``approve``, ``reject``, ``respond``."""
        return _ACTIONS.get(self.kind, ("respond",))

    def enabled(self, action: str) -> bool:
        """Whether ``action`` can be sent now (the buttons' enabled state)."""
        return self._blocker(action) is None

    def _blocker(self, action: str) -> str | None:
        model = self._model
        if action not in self.actions:
            return f"a {self.kind} interrupt cannot be answered with {action}"
        if model.actions is None:
            return "this view is read-only (it has no run handle to decide with)"
        if self.busy:
            return "a decision for this card is already being sent"
        if self.decision is not None:
            return f"already {_DECIDED.get(self.decision, self.decision)}"
        if model.state != "PAUSED":
            return f"the run is {model.state}, not waiting for a decision"
        return None

    def edits(self) -> dict[str, Any] | None:
        """The edited arguments, or None when they equal the original ones.

        Raises InvalidEditsError (a ValueError) with every problem found (not JSON, not an object, or
        not matching the interrupt's ``input_schema``).
        """
        try:
            value = json.loads(self.arguments_text)
        except json.JSONDecodeError as exc:
            raise refused("ERR_INVALID_EDITS", f"The arguments are not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise refused(
                "ERR_INVALID_EDITS", f"The arguments must be a JSON object, not {_json_type(value)}."
            )
        problems = validate_json(value, self.interrupt.input_schema)
        if problems:
            raise refused(
                "ERR_INVALID_EDITS", "The arguments do not match the tool's schema: " + "; ".join(problems)
            )
        return None if value == self.interrupt.arguments else value

    def approve(self) -> bool:
        """Approves the call, with the edited arguments if they changed."""
        if not self._check("approve"):
            return False
        try:
            edits = self.edits()
        except ValueError as exc:
            return self._refuse(str(exc))
        action = "approve_with_edits" if edits is not None else "approve"
        return self._send(action, lambda a: a.approve(self.interrupt_id, edits))

    def reject(self, reason: str | None = None) -> bool:
        """Rejects the call; the reason (``reason_text`` by default) is what the model sees."""
        if not self._check("reject"):
            return False
        text = (self.reason_text if reason is None else reason).strip()
        if not text:
            return self._refuse("Give a reason for rejecting: the model sees it.")
        return self._send("reject", lambda a: a.reject(self.interrupt_id, text))

    def respond(self, output: Any = None) -> bool:
        """Answers in place of the tool: ``output`` (``response_text`` by default) is its result."""
        if not self._check("respond"):
            return False
        value = self.response_text if output is None else output
        if isinstance(value, str) and not value.strip():
            what = "an answer" if self.kind == "INPUT" else "the result to return"
            return self._refuse(f"Write {what} first.")
        return self._send("respond", lambda a: a.respond(self.interrupt_id, value))

    def _check(self, action: str) -> bool:
        with self._model._lock:
            problem = self._blocker(action)
        return True if problem is None else self._refuse(_sentence(problem))

    def _refuse(self, message: str) -> bool:
        with self._model._lock:
            self.message = message
            self._model._notify({CARDS})
        return False

    def _send(self, action: str, call: Callable[[Actions], Run]) -> bool:
        model = self._model
        with model._lock:
            # Checked again under the lock: a double click must not send twice.
            problem = self._blocker(action.removesuffix("_with_edits"))
            if problem is not None:
                self.message = _sentence(problem)
                model._notify({CARDS})
                return False
            assert model.actions is not None
            actions = model.actions
            self.busy, self.message = True, ""
            model._notify({CARDS})
        # The call itself runs outside the lock so the watcher keeps updating the view.
        try:
            run = call(actions)
        except MachinaError as exc:
            failure = str(exc)
        except Exception as exc:  # a closed client, a bug: shown in the card, not lost in a callback
            failure = f"{type(exc).__name__}: {exc}"
        else:
            with model._lock:
                self.busy, self.decision = False, action
                model._notify({CARDS})
                model.apply_run(run)
            return True
        with model._lock:
            self.busy, self.message = False, failure
            model._notify({CARDS})
        return False


class RunViewModel:
    """Everything a view shows about one run, folded from events and snapshots.

    Args:
        run: a snapshot to start from (e.g. ``handle.run``); optional.
        actions: what cards decide with (a sync ``RunHandle``); None = read-only.
        after_seq: events up to this seq are taken as already seen (resume a view
            mid-stream); 0 replays the whole run.
    """

    def __init__(self, run: Run | None = None, *, actions: Actions | None = None, after_seq: int = 0) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._listeners: list[Listener] = []
        self.actions = actions
        self.run_id = ""
        self.thread_id = ""  # the thread the run continues ("" = a thread of its own)
        self.task = ""
        self.model_name = ""
        self.state = "QUEUED"
        self.pause_reason: str | None = None
        self.text = ""
        self.tool_log: list[ToolLogEntry] = []
        self.notes: list[str] = []
        self.handoff_tools: list[str] = []  # the tools of the latest handoff to a runner
        self.turns = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0
        self.started: datetime | None = None  # when the run started (its first event or create time)
        self.ended: datetime | None = None  # when it ended
        self.data: Any = None
        self.error: RunError | None = None
        self.cards: list[CardModel] = []
        self.watching = False
        self.watch_error: str | None = None
        self.last_seq = after_seq  # the newest event applied
        self.state_seq = -1  # the seq the state-like fields reflect
        self._text_turn: int | None = None
        # (seq, len(text) before it, turn before it) of each event that added text: a crash
        # recovery rolls the text back to before a seq.
        self._text_marks: list[tuple[int, int, int | None]] = []
        self._turns_with_deltas: set[int] = set()
        self._tools: dict[str, ToolLogEntry] = {}
        self._interrupt_calls: dict[str, str] = {}
        if run is not None:
            self.apply_run(run)

    def __repr__(self) -> str:
        return (
            f"RunViewModel(run_id={self.run_id!r}, state={str(self.state)!r}, last_seq={self.last_seq}, "
            f"cards={[c.interrupt_id for c in self.cards]!r})"
        )

    # -- reading ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def paused(self) -> bool:
        return self.state == "PAUSED"

    def card(self, interrupt_id: str) -> CardModel:
        """The card of a pending interrupt (KeyError if it is not pending)."""
        with self._lock:
            for card in self.cards:
                if card.interrupt_id == interrupt_id:
                    return card
        raise KeyError(interrupt_id)

    def _repr_html_(self) -> str:
        with self._lock:
            return _render.view_html(self)

    def counters_text(self) -> str:
        return _render.counters_text(self.turns, self.input_tokens, self.output_tokens, self.cost_usd)

    @property
    def running_tools(self) -> list[str]:
        """The tools running now, in the order they started."""
        with self._lock:
            return [entry.tool_name for entry in self.tool_log if entry.status == "running"]

    def elapsed(self, now: datetime | None = None) -> float:
        """Seconds from the run's start to its end, or to ``now`` (default: the clock) while it goes on."""
        with self._lock:
            if self.started is None:
                return 0.0
            end = self.ended or now or datetime.now(UTC)
            return max(0.0, (end - self.started).total_seconds())

    def progress_text(self, now: datetime | None = None) -> str:
        """One line: state, turns, tokens, cost, elapsed time and the tool running now."""
        with self._lock:
            return _render.progress_text(self, self.elapsed(now))

    # -- listening -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Calls ``listener(model, changed)`` after every change; returns an unsubscribe.

        The listener is called once at once with every aspect, to draw the start state.
        It runs with the model locked, so it must not block or call the engine.
        """
        with self._lock:
            self._listeners.append(listener)
            self._call(listener, ALL)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def wait_for(self, predicate: Callable[[RunViewModel], bool], timeout: float | None = None) -> bool:
        """Blocks until ``predicate(model)`` holds (e.g. a card appeared); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def _call(self, listener: Listener, changed: frozenset[str]) -> None:
        try:
            listener(self, changed)
        except Exception:  # one broken view must not stop the watcher feeding the others
            log.exception("a run view listener failed")

    def _notify(self, changed: set[str] | frozenset[str]) -> None:
        if not changed:
            return
        frozen = frozenset(changed)
        for listener in list(self._listeners):
            self._call(listener, frozen)
        self._changed.notify_all()

    # -- feeding ---------------------------------------------------------------------

    def apply(self, event: RunEvent) -> bool:
        """Folds one event in; False (and nothing changes) if it was seen already."""
        with self._lock:
            if event.seq <= self.last_seq:
                return False
            if self.run_id and event.run_id and event.run_id != self.run_id:
                raise ValueError(f"event of run {event.run_id!r} fed to the view of {self.run_id!r}")
            self.run_id = self.run_id or event.run_id
            self.last_seq = event.seq
            fresh = event.seq > self.state_seq
            if fresh:
                self.state_seq = event.seq
            changed: set[str] = set()
            self._fold(event, fresh, changed)
            self._notify(changed)
            return True

    def apply_run(self, run: Run) -> bool:
        """Takes a snapshot's state, unless the events already showed a newer one."""
        with self._lock:
            if self.run_id and run.run_id != self.run_id:
                raise ValueError(f"run {run.run_id!r} fed to the view of {self.run_id!r}")
            if run.last_seq < self.state_seq:
                return False
            self.state_seq = run.last_seq
            self.run_id, self.task = run.run_id, run.task
            if run.thread_id and run.thread_id != run.run_id:
                self.thread_id = run.thread_id
            self.state, self.pause_reason = run.state, run.pause_reason
            self.data, self.error = run.data, run.error
            self._take_meta(run.meta)
            self.started = self.started or run.create_time
            if run.state in TERMINAL_STATES:
                self.ended = self.ended or run.update_time
            self._set_cards(run.interrupts if run.state == "PAUSED" else [])
            self._notify({STATUS, CARDS})
            return True

    def set_watching(self, watching: bool, error: str | None = None) -> None:
        with self._lock:
            self.watching = watching
            if error is not None or watching:
                self.watch_error = error
            self._notify({STATUS})

    def _take_meta(self, meta: RunMeta) -> None:
        self.turns = meta.turns
        self.input_tokens, self.output_tokens = meta.usage.input_tokens, meta.usage.output_tokens
        self.cost_usd = meta.cost_usd
        self.model_name = meta.model or self.model_name

    def _set_cards(self, interrupts: list[Interrupt]) -> None:
        existing = {card.interrupt_id: card for card in self.cards}
        # The same card object survives a refresh, so what the person typed is kept.
        self.cards = [existing.get(i.interrupt_id) or CardModel(self, i) for i in interrupts]
        for interrupt in interrupts:
            if interrupt.call_id:
                self._interrupt_calls[interrupt.interrupt_id] = interrupt.call_id

    def _entry(
        self, call_id: str, tool_name: str, arguments: dict[str, Any], agent_path: str = ""
    ) -> ToolLogEntry:
        # A subagent's call ids are its own: its entries are keyed by its path too.
        key = f"{agent_path}/{call_id}" if agent_path else call_id
        entry = self._tools.get(key)
        if entry is None:
            entry = ToolLogEntry(call_id, tool_name, arguments, "planned", agent_path=agent_path)
            self._tools[key] = entry
            self.tool_log.append(entry)
        return entry

    def _add_text(self, text: str, turn: int, seq: int) -> None:
        if not text:
            return
        self._text_marks.append((seq, len(self.text), self._text_turn))
        if self.text and self._text_turn is not None and turn != self._text_turn:
            self.text += "\n\n"
        self.text += text
        self._text_turn = turn

    def _roll_back_text(self, from_seq: int) -> None:
        """Drop the text that events from ``from_seq`` on added: the run redoes that turn."""
        while self._text_marks and self._text_marks[-1][0] >= from_seq:
            _, length, turn = self._text_marks.pop()
            self.text, self._text_turn = self.text[:length], turn

    def _fold(self, event: RunEvent, fresh: bool, changed: set[str]) -> None:
        if event.agent_path and isinstance(event, TextDelta | AssistantMessage):
            return  # a subagent's text is its own: its answer shows in the tool log and the notes
        if event.agent_path and isinstance(event, UsageReported):
            if fresh:  # what subagents spend counts for the run, their turns are their own
                self.input_tokens += event.input_tokens
                self.output_tokens += event.output_tokens
                self.cost_usd += event.cost_usd if math.isfinite(event.cost_usd) else 0.0
                changed.add(STATUS)
            return
        path = event.agent_path
        if isinstance(event, TextDelta):
            self._turns_with_deltas.add(event.turn)
            self._add_text(event.text, event.turn, event.seq)
            changed.add(TEXT)
            if fresh and event.turn > self.turns:
                self.turns = event.turn
                changed.add(STATUS)
        elif isinstance(event, AssistantMessage):
            # A model that does not stream sends its text only here.
            if event.turn not in self._turns_with_deltas and event.text:
                self._add_text(event.text, event.turn, event.seq)
                changed.add(TEXT)
            if fresh and event.turn > self.turns:
                self.turns = event.turn
                changed.add(STATUS)
        elif isinstance(event, ToolCallStarted):
            entry = self._entry(event.call.call_id, event.call.tool_name, event.call.arguments, path)
            entry.arguments, entry.status = event.call.arguments, "running"
            changed.add(TOOLS)
        elif isinstance(event, ToolCallCompleted):
            entry = self._entry(event.call_id, event.tool_name, {}, path)
            if event.outcome == "ran":
                entry.status = "error" if event.is_error else "ok"
            elif not entry.decision:  # a decision's label (e.g. "rejected (expired)") says more
                entry.status = event.outcome.replace("_", " ")
            entry.output, entry.duration_ms = event.output, event.duration_ms
            changed.add(TOOLS)
        elif isinstance(event, _InterruptRaised):
            interrupt = event.interrupt
            key = f"{path}/{interrupt.call_id}" if path else interrupt.call_id
            self._interrupt_calls[interrupt.interrupt_id] = key
            entry = self._entry(interrupt.call_id, interrupt.tool_name, interrupt.arguments, path)
            entry.status = _AWAITING.get(interrupt.kind, "awaiting decision")
            changed.add(TOOLS)
        elif isinstance(event, ApprovalDecided):
            label = _DECIDED.get(event.decision, event.decision) + (" (expired)" if event.expired else "")
            call_id = self._interrupt_calls.get(event.interrupt_id)
            decided = self._tools.get(call_id) if call_id else None
            name = decided.tool_name if decided is not None else event.interrupt_id
            if decided is not None:
                decided.status = decided.decision = label
                decided.decided_by = event.decided_by
                if event.reason:
                    decided.output = event.reason
                changed.add(TOOLS)
            why = f": {event.reason}" if event.reason else ""
            self.notes.append(f"{name} {label} by {event.decided_by or '?'}{why}")
            changed.add(NOTES)
            if fresh:
                before = len(self.cards)
                self.cards = [c for c in self.cards if c.interrupt_id != event.interrupt_id]
                if len(self.cards) != before:
                    changed.add(CARDS)
        elif isinstance(event, Paused):
            pending = f", {len(event.interrupts)} pending" if event.interrupts else ""
            self.notes.append(f"paused: {event.reason}{pending}")
            changed.add(NOTES)
            if fresh:
                self.state, self.pause_reason = "PAUSED", event.reason
                self._set_cards(event.interrupts)
                changed.update((STATUS, CARDS))
        elif isinstance(event, Resumed):
            self.notes.append(f"resumed by {event.resumed_by or '?'}")
            if event.rolled_back_from_seq:
                self._roll_back_text(event.rolled_back_from_seq)
                self.notes.append(f"events from seq {event.rolled_back_from_seq} on were undone by a crash")
                changed.add(TEXT)
            changed.add(NOTES)
            if fresh:
                self.state, self.pause_reason = "RUNNING", None
                if self.cards:
                    self.cards = []
                    changed.add(CARDS)
                changed.add(STATUS)
        elif isinstance(event, RunStarted):
            self.task, self.model_name = event.task, event.model
            self.started = self.started or event.time
            self.notes.append(f"started on {event.model}")
            changed.add(NOTES)
            if fresh:
                self.state = "RUNNING"
                changed.add(STATUS)
        elif isinstance(event, UsageReported):
            if fresh:
                self.input_tokens += event.input_tokens
                self.output_tokens += event.output_tokens
                self.cost_usd += event.cost_usd if math.isfinite(event.cost_usd) else 0.0
                self.turns = max(self.turns, event.turn)
                changed.add(STATUS)
        elif isinstance(event, AgentStarted):
            self.notes.append(f"subagent {path} started: {_render.clip(event.task)}")
            changed.add(NOTES)
        elif isinstance(event, AgentFinished):
            how = event.error.code if event.error is not None else _render.clip(event.output)
            self.notes.append(f"subagent {path} {str(event.state).lower()}: {how}")
            changed.add(NOTES)
        elif isinstance(event, ContextCompacted):
            whose = f"subagent {path} " if path else ""
            self.notes.append(
                f"{whose}context compacted before turn {event.turn}: "
                f"{event.turns_summarized} turns summarised, "
                f"~{event.tokens_before:,} → ~{event.tokens_after:,} tokens"
            )
            changed.add(NOTES)
            if fresh:  # the summarising call counts in the run's usage and cost
                self.input_tokens += event.usage.input_tokens
                self.output_tokens += event.usage.output_tokens
                self.cost_usd += event.cost_usd if math.isfinite(event.cost_usd) else 0.0
                changed.add(STATUS)
        elif isinstance(event, HandoffToRunner):
            self.handoff_tools = list(event.tools)
            self.notes.append(f"handed off to the runner for {', '.join(event.tools) or 'its tools'}")
            changed.update((NOTES, STATUS))
        elif isinstance(event, ApiCallMetered):
            self.notes.append(f"api {event.service} {event.method} {event.path} → {event.status}")
            changed.add(NOTES)
        elif isinstance(event, RunFinished):
            self.notes.append(f"finished: {event.state}" + (f" ({event.error.code})" if event.error else ""))
            changed.add(NOTES)
            if fresh:
                self.state, self.pause_reason = event.state, None
                self.data, self.error = event.data, event.error
                self.ended = event.time
                self._take_meta(event.meta)
                if self.cards:
                    self.cards = []
                    changed.add(CARDS)
                changed.add(STATUS)


class Watcher:
    """Feeds a ``RunViewModel`` from a sync ``RunHandle``'s event stream until the run ends.

    It starts after the model's ``last_seq``; when the stream ends it takes one
    last snapshot. Errors end it and are shown as ``model.watch_error``.
    """

    def __init__(self, handle: RunHandle, model: RunViewModel) -> None:
        self._handle = handle
        self._model = model
        self._future: Any = None
        self._finished = threading.Event()

    def __repr__(self) -> str:
        return f"Watcher(run_id={self._handle.run_id!r}, running={self.running})"

    @property
    def running(self) -> bool:
        return self._future is not None and not self._finished.is_set()

    def start(self) -> Self:
        if self._future is not None:
            raise RuntimeError("a Watcher can only be started once")
        # The sync client's private loop thread: every RPC of this handle already
        # runs there, so the stream needs no thread of its own and can be cancelled.
        loop = self._handle._portal._loop
        self._model.set_watching(True)
        self._future = asyncio.run_coroutine_threadsafe(self._watch(), loop)
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the stream to end (the run finished, or ``stop()``); True if it did."""
        return self._finished.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops following the run (the run itself goes on)."""
        if self._future is not None and not self._finished.is_set():
            self._future.cancel()
            self._finished.wait(timeout)

    async def _watch(self) -> None:
        handle = self._handle._handle
        error: str | None = None
        try:
            async for event in handle.events(after_seq=self._model.last_seq, follow=True):
                self._model.apply(event)
            self._model.apply_run(await handle.refresh())
        except MachinaError as exc:
            error = f"stopped watching: {exc}"
        except Exception as exc:  # shown in the view rather than lost in a background task
            log.exception("watching run %s failed", handle.run_id)
            error = f"stopped watching: {type(exc).__name__}: {exc}"
        finally:
            self._model.set_watching(False, error)
            self._finished.set()

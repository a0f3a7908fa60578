"""The notebook view model (client_py._view), driven directly with events, runs and fake actions."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from client_py import (
    AgentFinished,
    AgentStarted,
    ApprovalDecided,
    ApprovalRequested,
    AssistantMessage,
    ContextCompacted,
    HandoffToRunner,
    InputRequested,
    Interrupt,
    InvalidEditsError,
    Paused,
    ProgressLine,
    Resumed,
    Run,
    RunError,
    RunEvent,
    RunFinished,
    RunMeta,
    RunStarted,
    TextDelta,
    ToolCall,
    ToolCallCompleted,
    ToolCallStarted,
    Usage,
    UsageReported,
    _render,
)
from client_py._view import CARDS, TEXT, RunViewModel, validate_json

RUN_ID = "run_1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
EMAIL_SCHEMA: dict[str, Any] = {
    "title": "EmailArgs",
    "type": "object",
    "properties": {
        "to": {"type": "string", "description": "Recipient address."},
        "subject": {"type": "string"},
        "body": {"type": "string"},
    },
    "required": ["to", "subject", "body"],
}
EMAIL = {"to": "alice@example.com", "subject": "Weather", "body": "Sunny."}


def interrupt(
    interrupt_id: str = "int_a",
    *,
    kind: str = "APPROVAL",
    tool_name: str = "send_email",
    arguments: dict[str, Any] | None = None,
    schema: dict[str, Any] | None = EMAIL_SCHEMA,
    question: str = "",
) -> Interrupt:
    return Interrupt(
        interrupt_id=interrupt_id,
        kind=kind,
        call_id=interrupt_id.removeprefix("int_"),
        tool_name=tool_name,
        arguments=dict(EMAIL if arguments is None else arguments),
        description=f"{tool_name} {interrupt_id}",
        question=question,
        create_time=T0,
        expire_time=None,
        input_schema=schema,
    )


def snapshot(
    state: str,
    last_seq: int,
    *,
    interrupts: list[Interrupt] | None = None,
    data: Any = None,
    error: RunError | None = None,
    meta: RunMeta | None = None,
) -> Run:
    reason = None
    if state == "PAUSED":
        reason = "AWAITING_APPROVAL" if interrupts else "HANDOFF_TO_RUNNER"
    return Run(
        run_id=RUN_ID,
        workspace_id="default",
        state=state,
        pause_reason=reason,
        interrupts=list(interrupts or []),
        data=data,
        error=error,
        meta=meta or RunMeta(),
        create_time=T0,
        update_time=T0,
        task="Email Alice",
        last_seq=last_seq,
    )


class Feed:
    """Numbers events like the engine does: gap-free seq per run."""

    def __init__(self) -> None:
        self.events: list[RunEvent] = []

    def __call__(self, cls: Callable[..., RunEvent], **fields: Any) -> RunEvent:
        event = cls(run_id=RUN_ID, seq=len(self.events) + 1, time=T0, **fields)
        self.events.append(event)
        return event

    @property
    def seq(self) -> int:
        return len(self.events)


def deltas(feed: Feed, text: str, turn: int) -> None:
    words = text.split(" ")
    for index, word in enumerate(words):
        feed(TextDelta, text=word + (" " if index < len(words) - 1 else ""), turn=turn)


def approval_run(feed: Feed) -> dict[str, int]:
    """A whole run: weather, two emails needing approval (one approved with edits, one rejected), done."""
    marks = {}
    feed(RunStarted, task="Email Alice", model="scripted:script")
    deltas(feed, "Checking the weather.", 1)
    call = ToolCall("c1", "get_weather", {"city": "Paris"})
    feed(AssistantMessage, text="Checking the weather.", tool_calls=[call], turn=1)
    feed(UsageReported, turn=1, input_tokens=10, output_tokens=4, cost_usd=0.001)
    feed(ToolCallStarted, call=call)
    feed(
        ToolCallCompleted,
        call_id="c1",
        tool_name="get_weather",
        is_error=False,
        size_bytes=5,
        output="sunny",
        duration_ms=3,
    )
    deltas(feed, "Emailing now.", 2)
    first, second = interrupt("int_a"), interrupt("int_b", arguments={**EMAIL, "to": "bob@example.com"})
    feed(UsageReported, turn=2, input_tokens=20, output_tokens=3, cost_usd=0.002)
    feed(ApprovalRequested, interrupt=first)
    feed(ApprovalRequested, interrupt=second)
    feed(Paused, reason="AWAITING_APPROVAL", interrupts=[first, second])
    marks["paused"] = feed.seq
    feed(
        ApprovalDecided,
        interrupt_id="int_a",
        decision="approve_with_edits",
        decided_by="ada",
        decide_time=T0,
        arguments_sha256="x",
        expired=False,
        reason="",
    )
    marks["one_decided"] = feed.seq
    feed(
        ApprovalDecided,
        interrupt_id="int_b",
        decision="reject",
        decided_by="ada",
        decide_time=T0,
        arguments_sha256="",
        expired=False,
        reason="not Bob",
    )
    feed(Resumed, resumed_by="ada")
    edited = ToolCall("a", "send_email", {**EMAIL, "subject": "Paris"})
    feed(ToolCallStarted, call=edited)
    feed(
        ToolCallCompleted,
        call_id="a",
        tool_name="send_email",
        is_error=False,
        size_bytes=9,
        output="queued",
        duration_ms=1,
    )
    deltas(feed, "All done.", 3)
    feed(UsageReported, turn=3, input_tokens=30, output_tokens=2, cost_usd=0.003)
    meta = RunMeta(turns=3, usage=Usage(60, 9), cost_usd=0.006, model="scripted:script")
    feed(RunFinished, state="DONE", data="All done.", error=None, meta=meta)
    marks["finished"] = feed.seq
    return marks


class FakeActions:
    """Stands in for a RunHandle: records decisions, answers with a snapshot, can block or fail."""

    def __init__(self, answer: Callable[[str, str], Run]) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.answer = answer
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.error: Exception | None = None

    def _decide(self, action: str, interrupt_id: str, payload: Any) -> Run:
        self.calls.append((action, interrupt_id, payload))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.error is not None:
            raise self.error
        return self.answer(action, interrupt_id)

    def approve(self, interrupt_id: str, edits: Mapping[str, Any] | None = None) -> Run:
        return self._decide("approve", interrupt_id, edits)

    def reject(self, interrupt_id: str, reason: str = "") -> Run:
        return self._decide("reject", interrupt_id, reason)

    def respond(self, interrupt_id: str, output: Any) -> Run:
        return self._decide("respond", interrupt_id, output)


def paused_model(*pending: Interrupt, actions: FakeActions | None = None) -> RunViewModel:
    pending = pending or (interrupt("int_a"),)
    model = RunViewModel(actions=actions)
    model.apply_run(snapshot("PAUSED", 5, interrupts=list(pending)))
    return model


def remaining_after(model_pending: list[Interrupt], last_seq: int) -> Callable[[str, str], Run]:
    """Answers like the engine: the decided interrupt goes; the run resumes when none is left."""
    left = list(model_pending)
    seq = [last_seq]

    def answer(action: str, interrupt_id: str) -> Run:
        left[:] = [i for i in left if i.interrupt_id != interrupt_id]
        seq[0] += 1
        return snapshot("PAUSED" if left else "RUNNING", seq[0], interrupts=left)

    return answer


# --- folding events ------------------------------------------------------------------


def test_a_whole_run_folds_into_state_text_log_and_counters() -> None:
    feed = Feed()
    marks = approval_run(feed)
    model = RunViewModel()
    seen: list[tuple[str, int, int]] = []
    model.subscribe(lambda m, changed: seen.append((m.state, len(m.cards), m.last_seq)))
    for event in feed.events:
        assert model.apply(event)
        if event.seq == marks["paused"]:
            assert model.state == "PAUSED"
            assert model.pause_reason == "AWAITING_APPROVAL"
            assert [c.interrupt_id for c in model.cards] == ["int_a", "int_b"]
            assert [e.status for e in model.tool_log] == ["ok", "awaiting approval", "awaiting approval"]
        if event.seq == marks["one_decided"]:
            assert model.state == "PAUSED"
            assert [c.interrupt_id for c in model.cards] == ["int_b"]
    assert model.state == "DONE"
    assert model.pause_reason is None
    assert model.cards == []
    assert model.data == "All done."
    assert model.error is None
    assert model.text == "Checking the weather.\n\nEmailing now.\n\nAll done."
    assert [(e.tool_name, e.status, e.decision) for e in model.tool_log] == [
        ("get_weather", "ok", ""),
        ("send_email", "ok", "approved with edits"),
        ("send_email", "rejected", "rejected"),
    ]
    assert model.tool_log[1].arguments["subject"] == "Paris"  # the edited arguments ran
    assert model.tool_log[2].output == "not Bob"
    assert (model.turns, model.input_tokens, model.output_tokens) == (3, 60, 9)
    assert model.counters_text() == "turns 3 · tokens 60 in / 9 out · $0.0060"
    assert model.notes[0] == "started on scripted:script"
    assert "send_email rejected by ada: not Bob" in model.notes
    assert model.notes[-1] == "finished: DONE"
    # Listeners saw the run move: RUNNING, then PAUSED with two cards, then one, then DONE.
    states = [s for s, _, _ in seen]
    assert states[0] == "QUEUED"
    assert states[-1] == "DONE"
    assert ("PAUSED", 2, marks["paused"]) in seen
    assert ("PAUSED", 1, marks["one_decided"]) in seen


def test_text_streams_per_turn_and_a_non_streaming_turn_still_shows() -> None:
    feed = Feed()
    model = RunViewModel()
    chunks: list[str] = []
    model.subscribe(lambda m, changed: chunks.append(m.text) if TEXT in changed else None)
    for event in (
        feed(TextDelta, text="Hel", turn=1),
        feed(TextDelta, text="lo", turn=1),
        feed(AssistantMessage, text="Hello", tool_calls=[], turn=1),  # deltas already showed it
        feed(AssistantMessage, text="Second turn, not streamed.", tool_calls=[], turn=2),
    ):
        model.apply(event)
    assert model.text == "Hello\n\nSecond turn, not streamed."
    assert chunks == ["", "Hel", "Hello", model.text]  # the first call draws the start state
    assert model.turns == 2


def test_text_a_crash_undid_is_replaced_by_the_redone_turn() -> None:
    feed = Feed()
    model = RunViewModel()
    feed(RunStarted, task="t", model="scripted:script")
    deltas(feed, "First turn.", 1)
    feed(AssistantMessage, text="First turn.", tool_calls=[], turn=1)
    undone_from = feed.seq + 1
    deltas(feed, "Second turn, cut sh", 2)  # the engine died here; the run redoes turn 2
    feed(Resumed, resumed_by="recovery", rolled_back_from_seq=undone_from)
    deltas(feed, "Second turn, whole.", 2)
    for event in feed.events:
        model.apply(event)
    assert model.text == "First turn.\n\nSecond turn, whole."
    assert any("undone by a crash" in note for note in model.notes)


def test_a_compaction_is_noted_and_its_call_counted() -> None:
    feed = Feed()
    model = RunViewModel()
    feed(UsageReported, turn=1, input_tokens=900, output_tokens=4, cost_usd=0.01)
    feed(
        ContextCompacted,
        turn=2,
        turns_summarized=5,
        tokens_before=3_300,
        tokens_after=800,
        usage=Usage(3_000, 90),
        cost_usd=0.02,
    )
    for event in feed.events:
        model.apply(event)
    assert any("5 turns summarised, ~3,300 → ~800 tokens" in note for note in model.notes)
    assert (model.input_tokens, model.output_tokens) == (3_900, 94)
    assert model.cost_usd == pytest.approx(0.03)


def test_a_failed_run_shows_its_error() -> None:
    feed = Feed()
    model = RunViewModel()
    model.apply(feed(RunStarted, task="t", model="scripted"))
    error = RunError("ERR_MAX_TURNS", "the run reached max_turns (1)")
    model.apply(feed(RunFinished, state="FAILED", data=None, error=error, meta=RunMeta(turns=1)))
    assert model.state == "FAILED"
    assert model.done
    assert model.error == error
    page = _render.view_html(model)
    assert "ERR_MAX_TURNS" in page
    assert "FAILED" in page
    assert model.notes[-1] == "finished: FAILED (ERR_MAX_TURNS)"


def test_handoff_to_the_runner_is_shown() -> None:
    feed = Feed()
    model = RunViewModel()
    model.apply(feed(RunStarted, task="t", model="scripted"))
    model.apply(feed(HandoffToRunner, tools=["Bash"]))
    model.apply(feed(Paused, reason="HANDOFF_TO_RUNNER", interrupts=[]))
    assert model.state == "PAUSED"
    assert model.pause_reason == "HANDOFF_TO_RUNNER"
    assert model.cards == []  # nothing for a person to decide
    assert model.handoff_tools == ["Bash"]
    assert "handed off to the runner for Bash" in model.notes
    assert "handed off to the runner for <b>Bash</b>" in _render.handoff_html(model)
    model.apply(feed(Resumed, resumed_by="runner"))
    assert model.state == "RUNNING"
    assert model.notes[-1] == "resumed by runner"
    assert model.handoff_tools == ["Bash"]  # the view keeps saying where the work went


def test_an_input_interrupt_is_answered_with_text() -> None:
    question = interrupt(
        "int_q", kind="INPUT", tool_name="AskUser", arguments={"question": "Colour?"}, question="Colour?"
    )
    actions = FakeActions(remaining_after([question], 5))
    feed = Feed()
    model = RunViewModel(actions=actions)
    model.apply(feed(InputRequested, interrupt=question))
    model.apply(feed(Paused, reason="AWAITING_INPUT", interrupts=[question]))
    (card,) = model.cards
    assert card.actions == ("respond",)
    assert not card.enabled("approve")
    assert not card.approve()
    assert "cannot be answered with approve" in card.message
    assert not card.respond()  # nothing typed yet
    assert card.message == "Write an answer first."
    card.response_text = "Blue"
    assert card.respond()
    assert actions.calls == [("respond", "int_q", "Blue")]
    assert model.tool_log[0].status == "awaiting answer"


# --- cards and decisions ------------------------------------------------------------------


def test_several_interrupts_are_decided_one_by_one() -> None:
    first, second, third = interrupt("int_a"), interrupt("int_b"), interrupt("int_c")
    actions = FakeActions(remaining_after([first, second, third], 5))
    model = paused_model(first, second, third, actions=actions)
    card_b = model.card("int_b")
    card_b.reason_text = "  not this one  "
    assert card_b.reject()
    assert [c.interrupt_id for c in model.cards] == ["int_a", "int_c"]
    assert card_b.decision == "reject"
    assert not card_b.enabled("approve")
    model.card("int_c").response_text = "sent by hand"
    assert model.card("int_c").respond()
    assert model.card("int_a").approve()
    assert actions.calls == [
        ("reject", "int_b", "not this one"),
        ("respond", "int_c", "sent by hand"),
        ("approve", "int_a", None),
    ]
    assert model.state == "RUNNING"
    assert model.cards == []


def test_a_card_survives_a_refresh_with_what_was_typed() -> None:
    model = paused_model(interrupt("int_a"), interrupt("int_b"))
    card = model.card("int_a")
    card.arguments_text = '{"to": "typed"}'
    model.apply_run(snapshot("PAUSED", 6, interrupts=[interrupt("int_a"), interrupt("int_b")]))
    assert model.card("int_a") is card
    assert card.arguments_text == '{"to": "typed"}'


def test_edits_are_sent_only_when_they_change_the_arguments() -> None:
    actions = FakeActions(remaining_after([interrupt("int_a"), interrupt("int_b")], 5))
    model = paused_model(interrupt("int_a"), interrupt("int_b"), actions=actions)
    model.card("int_a").arguments_text = '{"body": "Sunny.", "subject": "Weather", "to": "alice@example.com"}'
    assert model.card("int_a").approve()  # same JSON, another key order: a plain approve
    model.card("int_b").arguments_text = '{"to": "carol@example.com", "subject": "Weather", "body": "Sunny."}'
    assert model.card("int_b").approve()
    assert actions.calls == [
        ("approve", "int_a", None),
        ("approve", "int_b", {"to": "carol@example.com", "subject": "Weather", "body": "Sunny."}),
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object, not array"),
        ('{"to": "a@b", "subject": "s"}', "missing required key 'body'"),
        ('{"to": 5, "subject": "s", "body": "b"}', "$.to: expected string, got integer"),
        ('{"to": null, "subject": "s", "body": "b"}', "$.to: expected string, got null"),
    ],
)
def test_invalid_edits_are_refused_before_sending(text: str, problem: str) -> None:
    actions = FakeActions(remaining_after([interrupt("int_a")], 5))
    model = paused_model(interrupt("int_a"), actions=actions)
    card = model.card("int_a")
    shown: list[str] = []
    model.subscribe(lambda m, changed: shown.append(card.message) if CARDS in changed else None)
    card.arguments_text = text
    assert not card.approve()
    assert problem in card.message
    assert problem in shown[-1]
    assert actions.calls == []
    assert model.cards == [card]
    assert card.enabled("approve")
    card.arguments_text = '{"to": "a@b", "subject": "s", "body": "b"}'
    assert card.approve()
    assert card.message == ""


def test_the_small_validator_covers_pydantic_style_schemas() -> None:
    schema = {
        "$defs": {"Priority": {"enum": ["low", "high"], "type": "string"}},
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "to": {"type": "string", "minLength": 3},
            "cc": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
            "priority": {"$ref": "#/$defs/Priority"},
            "retries": {"type": "integer", "minimum": 0, "maximum": 5},
            "ratio": {"type": "number"},
        },
        "required": ["to"],
    }
    assert validate_json({"to": "bob", "cc": None, "priority": "low", "retries": 2, "ratio": 1}, schema) == []
    assert validate_json({"to": "bob", "cc": ["a", "b"], "retries": 3.0}, schema) == []
    problems = validate_json(
        {"to": "b", "cc": [1], "priority": "urgent", "retries": 9, "ratio": "x", "bcc": "z"}, schema
    )
    assert problems == [
        "$.to: shorter than 3 characters",
        "$.cc: matches none of the allowed shapes",
        '$.priority: must be one of ["low", "high"]',
        "$.retries: must be ≤ 5",
        "$.ratio: expected number, got string",
        "$: unexpected key 'bcc'",
    ]
    assert validate_json({"to": True}, schema) == ["$.to: expected string, got boolean"]
    assert validate_json({"anything": 1}, None) == []
    assert validate_json({"x": 1}, {"type": "object", "properties": {"x": {"type": "mystery"}}}) == []


def test_reject_needs_a_reason_and_the_engine_error_is_shown() -> None:
    actions = FakeActions(remaining_after([interrupt("int_a")], 5))
    model = paused_model(interrupt("int_a"), actions=actions)
    card = model.card("int_a")
    assert not card.reject()
    assert card.message == "Give a reason for rejecting: the model sees it."
    actions.error = InvalidEditsError("ERR_INVALID_EDITS", "edited arguments do not match", metadata={})
    card.arguments_text = '{"to": "x@y", "subject": "s", "body": "b"}'
    assert not card.approve()
    assert card.message == "ERR_INVALID_EDITS: edited arguments do not match"
    assert not card.busy
    assert card.decision is None
    assert card.enabled("approve")
    actions.error = None
    assert card.reject("Not today")
    assert actions.calls[-1] == ("reject", "int_a", "Not today")


def test_buttons_are_disabled_while_a_decision_is_in_flight() -> None:
    first, second = interrupt("int_a"), interrupt("int_b")
    actions = FakeActions(remaining_after([first, second], 5))
    actions.gate = threading.Event()
    model = paused_model(first, second, actions=actions)
    card, other = model.cards
    busy_seen: list[bool] = []
    model.subscribe(lambda m, changed: busy_seen.append(card.busy) if CARDS in changed else None)
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.append(card.approve()))
    sender.start()
    try:
        assert actions.entered.wait(5)
        assert card.busy
        assert not any(card.enabled(a) for a in ("approve", "reject", "respond"))
        assert not card.approve()  # a double click sends nothing
        assert "already being sent" in card.message
        assert other.enabled("approve")  # only the card in flight is blocked
        # The watcher keeps feeding the model meanwhile (the lock is not held during the call).
        assert model.apply(TextDelta(run_id=RUN_ID, seq=6, time=T0, text="still live", turn=2))
    finally:
        actions.gate.set()
        sender.join(5)
    assert results == [True]
    assert len(actions.calls) == 1
    assert not card.busy
    # mypy still narrows card.busy to True from the assert above (the send cleared it since).
    assert card.decision == "approve"  # type: ignore[unreachable]
    assert [c.interrupt_id for c in model.cards] == ["int_b"]
    assert True in busy_seen
    assert busy_seen[-1] is False


def test_a_read_only_model_has_no_enabled_actions() -> None:
    model = paused_model(interrupt("int_a"))
    card = model.card("int_a")
    assert not card.enabled("approve")
    assert not card.approve()
    assert "read-only" in card.message


def test_cards_refuse_once_the_run_moved_on() -> None:
    actions = FakeActions(remaining_after([interrupt("int_a")], 5))
    model = paused_model(interrupt("int_a"), actions=actions)
    card = model.card("int_a")
    model.apply(Resumed(run_id=RUN_ID, seq=6, time=T0, resumed_by="someone else"))
    assert model.cards == []
    assert not card.enabled("approve")
    assert not card.approve()
    assert "not waiting for a decision" in card.message
    assert actions.calls == []


# --- snapshots, replays and reattaching ---------------------------------------------------


def test_duplicate_events_are_ignored() -> None:
    feed = Feed()
    approval_run(feed)
    model = RunViewModel()
    for event in feed.events:
        model.apply(event)
    text, log, notes = model.text, list(model.tool_log), list(model.notes)
    counters = model.counters_text()
    assert not any(model.apply(event) for event in feed.events)  # the whole stream again
    assert (model.text, model.tool_log, model.notes, model.counters_text()) == (text, log, notes, counters)


def test_replay_after_reattach_rebuilds_the_view_without_duplicates() -> None:
    feed = Feed()
    marks = approval_run(feed)
    live = RunViewModel()
    for event in feed.events:
        live.apply(event)

    # "After a kernel restart": a new model starts from the attached run's snapshot...
    meta = RunMeta(turns=3, usage=Usage(60, 9), cost_usd=0.006, model="scripted:script")
    attached = RunViewModel(snapshot("DONE", marks["finished"], data="All done.", meta=meta))
    assert attached.state == "DONE"
    assert attached.text == ""
    # ...and replays the events from seq 0; the old events fill the logs, never the state.
    states = []
    for event in feed.events:
        attached.apply(event)
        states.append(attached.state)
    assert set(states) == {"DONE"}
    assert attached.cards == []
    assert attached.text == live.text
    assert attached.tool_log == live.tool_log
    assert attached.notes == live.notes
    assert attached.counters_text() == live.counters_text()  # usage not counted twice

    # Or from a given seq: only what came after it.
    partial = RunViewModel(after_seq=marks["one_decided"])
    for event in feed.events:
        partial.apply(event)
    assert partial.text == "All done."
    assert [e.tool_name for e in partial.tool_log] == ["send_email"]
    assert partial.state == "DONE"


def test_a_stale_snapshot_does_not_undo_newer_events() -> None:
    feed = Feed()
    marks = approval_run(feed)
    model = RunViewModel()
    for event in feed.events[: marks["paused"]]:
        model.apply(event)
    old = snapshot("RUNNING", marks["paused"] - 3)
    assert not model.apply_run(old)
    assert model.state == "PAUSED"
    assert len(model.cards) == 2
    newer = snapshot("PAUSED", marks["paused"] + 1, interrupts=[interrupt("int_b")])
    assert model.apply_run(newer)
    assert [c.interrupt_id for c in model.cards] == ["int_b"]
    # The event that snapshot already reflected changes the logs only.
    model.apply(feed.events[marks["paused"]])
    assert [c.interrupt_id for c in model.cards] == ["int_b"]


def test_events_of_another_run_are_refused() -> None:
    model = RunViewModel(snapshot("RUNNING", 0))
    with pytest.raises(ValueError, match="run 'other'"):
        model.apply(TextDelta(run_id="other", seq=1, time=T0, text="x", turn=1))
    with pytest.raises(ValueError, match="run 'other'"):
        model.apply_run(replace(snapshot("RUNNING", 1), run_id="other"))


def test_wait_for_wakes_up_when_another_thread_changes_the_model() -> None:
    model = RunViewModel(snapshot("RUNNING", 0))
    pending = interrupt("int_a")
    timer = threading.Timer(
        0.05,
        lambda: model.apply(
            Paused(run_id=RUN_ID, seq=1, time=T0, reason="AWAITING_APPROVAL", interrupts=[pending])
        ),
    )
    timer.start()
    try:
        assert model.wait_for(lambda m: len(m.cards) == 1, timeout=5)
    finally:
        timer.join()
    assert not model.wait_for(lambda m: m.done, timeout=0.01)


def test_a_broken_listener_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    model = RunViewModel()
    calls: list[int] = []

    def broken(m: RunViewModel, changed: frozenset[str]) -> None:
        raise RuntimeError("boom")

    model.subscribe(broken)
    unsubscribe = model.subscribe(lambda m, changed: calls.append(m.last_seq))
    assert model.apply(TextDelta(run_id=RUN_ID, seq=1, time=T0, text="x", turn=1))
    assert calls == [0, 1]
    assert "a run view listener failed" in caplog.text
    unsubscribe()
    model.apply(TextDelta(run_id=RUN_ID, seq=2, time=T0, text="y", turn=1))
    assert calls == [0, 1]


def test_the_static_html_view_escapes_everything() -> None:
    evil = "<script>alert(1)</script>"
    model = RunViewModel()
    model.apply(TextDelta(run_id=RUN_ID, seq=1, time=T0, text=evil, turn=1))
    model.apply(
        Paused(
            run_id=RUN_ID,
            seq=2,
            time=T0,
            reason="AWAITING_APPROVAL",
            interrupts=[interrupt("int_a", tool_name=evil, arguments={"x": evil})],
        )
    )
    page = model._repr_html_()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "PAUSED" in page


def test_progress_names_the_running_tool_and_the_elapsed_time() -> None:
    feed = Feed()
    model = RunViewModel()
    model.apply(feed(RunStarted, task="t", model="scripted:script"))
    call = ToolCall("c1", "Bash", {"command": "make"})
    model.apply(feed(AssistantMessage, text="Building.", tool_calls=[call], turn=1))
    model.apply(feed(UsageReported, turn=1, input_tokens=812, output_tokens=96, cost_usd=0.0042))
    model.apply(feed(ToolCallStarted, call=call))
    later = T0.replace(second=T0.second + 4)
    assert model.running_tools == ["Bash"]
    assert model.progress_text(now=later) == (
        "RUNNING · turns 1 · tokens 812 in / 96 out · $0.0042 · 4.0 s · ⚙ Bash"
    )
    model.apply(feed(ToolCallCompleted, call_id="c1", tool_name="Bash", is_error=False, size_bytes=0,
                     output="ok", duration_ms=4000))  # fmt: skip
    assert model.running_tools == []
    assert "⚙" not in model.progress_text(now=later)


def test_the_progress_line_redraws_in_place_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    feed = Feed()
    events = [
        feed(RunStarted, task="t", model="scripted:script"),
        feed(TextDelta, text="Hello ", turn=1),
        feed(TextDelta, text="there", turn=1),
        feed(AssistantMessage, text="Hello there", tool_calls=[], turn=1),
        feed(RunFinished, state="DONE", data="Hello there", error=None, meta=RunMeta(turns=1)),
    ]
    for out in (Tty(), io.StringIO()):
        line = ProgressLine(out, min_interval=0)
        for event in events:
            line.update(event)
            if isinstance(event, AssistantMessage):
                line.print("model: " + event.text)
        line.close()
        written = out.getvalue()
        assert written.endswith("DONE · turns 1 · tokens 0 in / 0 out · $0.0000 · 0.0 s\n"), written
        if isinstance(out, Tty):
            assert "\r\033[K" in written
            assert "· Hello there" in written  # the text being streamed, at the end of the line
        else:
            assert written == "model: Hello there\nDONE · turns 1 · tokens 0 in / 0 out · $0.0000 · 0.0 s\n"


def test_subagents_show_by_path_and_keep_their_text_to_themselves() -> None:
    feed = Feed()
    model = RunViewModel()
    agent_call = ToolCall("call_1_1", "Agent", {"task": "look it up"})
    for event in (
        feed(RunStarted, task="parent", model="scripted:script"),
        feed(AssistantMessage, text="", tool_calls=[agent_call], turn=1),
        feed(ToolCallStarted, call=agent_call),
        feed(
            AgentStarted,
            task="look it up",
            tools=["echo"],
            max_turns=5,
            max_tokens=0,
            max_cost_usd=0.0,
            agent_path="call_1_1",
        ),
        feed(TextDelta, text="child thinking", turn=1, agent_path="call_1_1"),
        feed(UsageReported, turn=1, input_tokens=7, output_tokens=3, cost_usd=0.0, agent_path="call_1_1"),
        # The child's call ids are its own: the same id as the parent's is another call.
        feed(ToolCallStarted, call=ToolCall("call_1_1", "echo", {"text": "x"}), agent_path="call_1_1"),
        feed(
            ToolCallCompleted,
            call_id="call_1_1",
            tool_name="echo",
            is_error=False,
            size_bytes=1,
            output="x",
            duration_ms=1,
            outcome="ran",
            agent_path="call_1_1",
        ),
        feed(
            AgentFinished, state="DONE", output="found x", error=None, meta=RunMeta(), agent_path="call_1_1"
        ),
        feed(
            ToolCallCompleted,
            call_id="call_1_1",
            tool_name="Agent",
            is_error=False,
            size_bytes=7,
            output="found x",
            duration_ms=0,
            outcome="ran",
        ),
    ):
        model.apply(event)
    assert model.text == ""  # the child's text is not the run's
    assert (model.turns, model.input_tokens, model.output_tokens) == (1, 7, 3)
    assert [(e.agent_path, e.tool_name, e.status, e.output) for e in model.tool_log] == [
        ("", "Agent", "ok", "found x"),
        ("call_1_1", "echo", "ok", "x"),
    ]
    assert "subagent call_1_1 started: look it up" in model.notes
    assert "subagent call_1_1 done: found x" in model.notes
    assert "call_1_1" in _render.tool_log_html(model.tool_log)
    gated = replace(interrupt("int_call_1_1/call_2_1"), agent_path="call_1_1")
    assert "(subagent call_1_1)" in str(gated)

"""States a run record keeps are enums in code and the same strings in storage."""

from __future__ import annotations

import json

import pytest

from engine_service import RunRecord, RunState
from engine_service.core._run import CallOutcome, CallStatus, PendingCall, RunMode
from engine_service.core._types import ToolCall


def stored(doc: object) -> object:
    return json.loads(json.dumps(doc))


@pytest.mark.parametrize("status", list(CallStatus))
@pytest.mark.parametrize("outcome", list(CallOutcome))
def test_a_pending_call_stores_plain_strings_and_reads_back_enums(
    status: CallStatus, outcome: CallOutcome
) -> None:
    call = PendingCall(ToolCall("c1", "Read", {"path": "a"}), status, outcome=outcome)
    doc = call.to_json()
    assert (doc["status"], doc["outcome"]) == (status.value, outcome.value)
    assert type(doc["status"]) is str
    assert type(doc["outcome"]) is str
    again = PendingCall.from_json(stored(doc))  # type: ignore[arg-type]
    assert (again.status, again.outcome) == (status, outcome)
    assert isinstance(again.status, CallStatus)
    assert isinstance(again.outcome, CallOutcome)


def test_strings_stored_before_read_as_the_same_states() -> None:
    doc = {"call": {"id": "c", "name": "Bash", "args": {}}, "status": "resolved", "outcome": "rejected"}
    call = PendingCall.from_json(doc)
    assert call.status == "resolved"
    assert call.outcome == "rejected"


@pytest.mark.parametrize("mode", list(RunMode))
def test_a_run_records_its_mode_as_a_string(mode: RunMode) -> None:
    record = RunRecord("r1", "ws", "task", RunState.QUEUED, 1.0, 1.0, mode=mode)
    doc = record.to_json()
    assert doc["mode"] == mode.value
    assert type(doc["mode"]) is str
    assert RunRecord.from_json(stored(doc)).mode is mode  # type: ignore[arg-type]

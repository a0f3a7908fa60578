"""Fuzz target: scripted turns from the wire (``RunSpec`` bytes → engine_service/api/_convert.py
``spec_from_proto`` → engine_service/models/_select.py ``validate_script``).

Contract: bytes that are not a RunSpec fail ``DecodeError``; a RunSpec whose script is invalid fails
``EngineError`` (``ERR_INVALID_SCRIPT`` / ``ERR_INVALID_REQUEST``); an accepted script has a text or
a named call in every turn, object arguments, and survives the trip through spec.json unchanged.
"""

from __future__ import annotations

import json

import atheris
from _harness import run

with atheris.instrument_imports(include=["engine_service.api._convert", "engine_service.models._select"]):
    from google.protobuf.message import DecodeError

    from engine_service.api._convert import spec_from_proto
    from engine_service.core._errors import EngineError
    from engine_service.core._run import ScriptedTurn
    from engine_service.models._select import validate_script
    from machina.engine.v1 import engine_service_pb2 as svc


def from_fields(fdp: atheris.FuzzedDataProvider) -> svc.RunSpec:
    """A structurally plausible spec, so the fuzzer reaches the validator quickly."""
    turns = []
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        calls = [
            svc.ScriptedToolCall(name=fdp.ConsumeUnicodeNoSurrogates(8))
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        ]
        for call in calls:
            if fdp.ConsumeBool():
                call.arguments.update({fdp.ConsumeUnicodeNoSurrogates(4): fdp.ConsumeRegularFloat()})
        turns.append(svc.ScriptedTurn(text=fdp.ConsumeUnicodeNoSurrogates(12), tool_calls=calls))
    return svc.RunSpec(task="t", model=svc.ModelSpec(provider="scripted", script=turns))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    try:
        message = from_fields(fdp) if fdp.ConsumeBool() else svc.RunSpec.FromString(fdp.ConsumeBytes(4096))
    except DecodeError:
        return
    try:
        spec, _ = spec_from_proto(message)
        if spec.script is None:
            return
        validate_script(spec.script)
    except EngineError as error:
        if not error.code.startswith("ERR_INVALID_"):
            raise
        return
    for turn in spec.script:
        if not (turn.text or turn.tool_calls):
            raise AssertionError(f"accepted an empty turn: {turn}")
        for name, arguments in turn.tool_calls:
            if not name or not isinstance(arguments, dict):
                raise AssertionError(f"accepted a call without a name or object arguments: {turn}")
    stored = [ScriptedTurn.from_json(json.loads(json.dumps(t.to_json()))) for t in spec.script]
    if stored != spec.script:
        raise AssertionError(f"the script changed through spec.json: {spec.script} -> {stored}")


if __name__ == "__main__":
    run(test_one_input)

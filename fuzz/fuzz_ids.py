"""Fuzz target: id validation (engine_service/core/_ids.py), the guard of every storage key.

Contract: ``is_valid_id`` accepts exactly ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` (checked here by an
independent implementation); ``check_id`` returns valid ids unchanged and refuses everything else
with ``ERR_INVALID_ID`` and a bounded message; an accepted id is one safe path segment and key part.
"""

from __future__ import annotations

import string

import atheris
from _harness import run

with atheris.instrument_imports(include=["engine_service.core._ids"]):
    from engine_service.core._errors import EngineError
    from engine_service.core._ids import check_id, is_valid_id

FIRST = set(string.ascii_letters + string.digits)
REST = FIRST | set("._-")


def expected(value: str) -> bool:
    return 1 <= len(value) <= 128 and value[0] in FIRST and all(c in REST for c in value[1:])


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    value = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 300))
    valid = is_valid_id(value)
    if valid != expected(value):
        raise AssertionError(f"is_valid_id({value!r}) = {valid}")
    try:
        checked = check_id(value, "run_id")
    except EngineError as error:
        if valid or error.code != "ERR_INVALID_ID":
            raise
        # The message shows at most 64 characters of the value (escaped: up to 10 characters each).
        if len(error.message) > 1000 or error.metadata.get("field") != "run_id":
            raise AssertionError(f"unbounded or unlabelled error for {value!r}: {error.message!r}") from None
        return
    if not valid or checked != value:
        raise AssertionError(f"check_id accepted {value!r}")
    if value in (".", "..") or any(c in value for c in "/\\\x00") or value != value.strip():
        raise AssertionError(f"accepted id {value!r} is not a safe path segment")


if __name__ == "__main__":
    run(test_one_input)

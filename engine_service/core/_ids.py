"""Identifier validation shared by every entry point (gRPC, runner, storage)."""

from __future__ import annotations

import re
import uuid

from engine_service.core._errors import invalid, shown

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise ``ERR_INVALID_ID``."""
    if not is_valid_id(value):
        raise invalid(
            "ERR_INVALID_ID",
            f"invalid {what} {shown(value)!r}: ids match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}",
            field=what,
            length=len(value),
        )
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"

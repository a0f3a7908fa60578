"""Conversions between Python JSON values and ``google.protobuf`` Value/Struct."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from client_py._errors import refused

# Doubles represent every integer up to here exactly; beyond it a float is honest.
_MAX_SAFE_INT = 2**53


def value_to_python(value: struct_pb2.Value) -> Any:
    """Returns the JSON value; integral numbers come back as ``int``.

    ``Value`` stores every number as a double, so ``{"n": 3}`` would otherwise
    return as ``3.0`` and surprise anyone comparing tool arguments.
    """
    match value.WhichOneof("kind"):
        case "number_value":
            number = value.number_value
            return int(number) if number.is_integer() and abs(number) <= _MAX_SAFE_INT else number
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "struct_value":
            return struct_to_dict(value.struct_value)
        case "list_value":
            return [value_to_python(item) for item in value.list_value.values]
        case _:
            return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: value_to_python(item) for key, item in struct.fields.items()}


def python_to_value(
    obj: Any, out: struct_pb2.Value | None = None, *, where: str = "value"
) -> struct_pb2.Value:
    """Fills ``out`` (or a new Value) from a JSON-compatible Python value."""
    value = struct_pb2.Value() if out is None else out
    # bool is an int subclass, so it must be checked first.
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int | float):
        if not math.isfinite(obj):
            raise refused("ERR_INVALID_REQUEST", f"{where}: {obj!r} is not a valid JSON number")
        value.number_value = float(obj)
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, Mapping):
        dict_to_struct(obj, value.struct_value, where=where)
    elif isinstance(obj, list | tuple):
        items = value.list_value
        items.SetInParent()
        for index, item in enumerate(obj):
            python_to_value(item, items.values.add(), where=f"{where}[{index}]")
    else:
        raise refused("ERR_INVALID_REQUEST", f"{where}: {type(obj).__name__} is not JSON-serialisable")
    return value


def dict_to_struct(
    obj: Mapping[str, Any], out: struct_pb2.Struct | None = None, *, where: str = "value"
) -> struct_pb2.Struct:
    if not isinstance(obj, Mapping):
        raise refused("ERR_INVALID_REQUEST", f"{where}: expected a dict, got {type(obj).__name__}")
    struct = struct_pb2.Struct() if out is None else out
    struct.SetInParent()
    for key, item in obj.items():
        if not isinstance(key, str):
            raise refused("ERR_INVALID_REQUEST", f"{where}: JSON object keys must be str, got {key!r}")
        python_to_value(item, struct.fields[key], where=f"{where}[{key!r}]")
    return struct


def to_datetime(timestamp: timestamp_pb2.Timestamp) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)

"""How every adapter encodes records and documents: compact UTF-8 JSON, one record a line.

orjson encodes a record several times faster than the standard library, which matters
because the event log takes one record per flush of a run's events. What orjson refuses
(integers past 64 bits, keys that are not strings) goes through the standard library
instead, as does reading what orjson cannot parse (``NaN`` and ``Infinity``, which files
written by earlier versions may hold): both read back the same documents.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# One encoder for the fallback: json.dumps with options builds a new one per call.
_encode_stdlib = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def dumps(doc: Any) -> bytes:
    """``doc`` as compact UTF-8 JSON (no trailing newline)."""
    try:
        return orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        return _encode_stdlib(doc).encode()


def dump_lines(docs: list[Any]) -> bytes:
    """``docs`` as JSON lines, each ending in a newline."""
    try:
        return b"".join([orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE) for doc in docs])
    except (orjson.JSONEncodeError, TypeError):
        return b"".join(dumps(doc) + b"\n" for doc in docs)


def loads(data: bytes | str) -> Any:
    """A JSON document (bytes or text)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


_SEQ_PREFIX = b'{"seq":'
_N_KEY = b',"n":'


def span(line: bytes) -> int:
    """How many indexes the encoded record ``line`` stands for: its ``"n"`` when that is its
    second key right after ``"seq"`` (how events of several seqs are written), else 1.

    Reads only the first bytes, so a reader can skip records without parsing them. Text inside
    a JSON string cannot fake the key: its quotes are escaped.
    """
    if not line.startswith(_SEQ_PREFIX):
        return 1
    at = len(_SEQ_PREFIX)
    while at < len(line) and 48 <= line[at] <= 57:  # the seq's digits
        at += 1
    if not line.startswith(_N_KEY, at):
        return 1
    at += len(_N_KEY)
    end = at
    while end < len(line) and 48 <= line[end] <= 57:
        end += 1
    return int(line[at:end]) if end > at else 1


def doc_span(doc: Any) -> int:
    """How many indexes the record ``doc`` stands for (its ``"n"``, default 1)."""
    n = doc.get("n", 1) if isinstance(doc, dict) else 1
    return n if isinstance(n, int) and n > 0 else 1

"""How deep a structured value may nest, wherever one enters or leaves the engine.

Protobuf refuses to parse (or convert) messages nested more than 100 deep, and a JSON value costs
more than its own depth there: each object level is three messages (``Value`` → ``Struct`` → map
entry), each list level two (``Value`` → ``ListValue``), under the messages that carry it (a tool
call's arguments in an interrupt in a ``Paused`` event is five down). A value that got into a run
too deep would break every response that carries it. Values are refused where they come in
(requests, scripts, tool-call arguments, structured answers, the runner's HTTP shim) past
`MAX_DEPTH`: objects nested that deep still fit any response with room to spare (5 + 3 × 24 = 77).
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 24
# A JSON Schema from a request (output_schema, a client tool's input_schema) is at most this many
# bytes as a protobuf Struct: checking and applying one is pure-Python work, about 4 ms per KB.
MAX_SCHEMA_BYTES = 64 * 1024
# Values with more nodes than this are validated in a worker thread, not on the event loop
# (checking a schema costs up to ~50 µs a node in jsonschema).
INLINE_NODES = 256


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deep ``value`` nests (a scalar is 0, ``[]`` and ``{}`` are 1); counting stops past ``limit``.

    Iterative, so a value nested far deeper than Python's recursion limit is measured too.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        level += 1
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        stack.extend((child, level) for child in children if isinstance(child, dict | list | tuple))
    return deepest


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    return depth(value, limit) > limit


def is_small(value: Any, nodes: int = INLINE_NODES) -> bool:
    """Whether ``value`` has at most ``nodes`` lists, objects and scalars; stops counting past that."""
    count = 0
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        count += 1
        if count > nodes:
            return False
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return True

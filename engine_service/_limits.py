"""How deep a structured value may nest, wherever one enters or leaves the engine.

A JSON value of lists and objects nested N deep is 2N protobuf messages deep as a
``google.protobuf.Value``; protobuf refuses to parse (or convert) past 100, so a value nested
50 deep that got into a run would break every response that carries it. Values are refused
where they come in (requests, scripts, tool-call arguments, structured answers, the runner's
HTTP shim) past `MAX_DEPTH`, well inside that limit even with the messages around them.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 32


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

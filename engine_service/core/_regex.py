"""Linear-time regular expressions for every pattern a tenant or a model supplies.

Python's ``re`` backtracks: ``(a+)+$`` against thirty ``a`` and a ``!`` takes seconds, and
doubles with each further character. Patterns from a tenant (ApiCall ``allowed_paths``, the
``pattern`` keywords of a tool's ``input_schema`` or of an ``output_schema``) and from a model
(``Grep``, ``Glob``) are compiled with RE2 instead, which matches in time linear in the text.
RE2 refuses what it cannot do in linear time (backreferences, lookaround, atomic groups):
those patterns get a clear `PatternError` where they enter, never a slow match later.

JSON Schema validation goes through `SchemaValidator`: Draft 2020-12 with ``pattern``,
``patternProperties`` and ``additionalProperties`` evaluated by RE2. `check_schema` refuses
what would still reach ``re`` inside jsonschema (a nested ``$schema`` that switches dialect,
``unevaluatedProperties`` beside ``patternProperties``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jsonschema
import re2
from jsonschema import Draft202012Validator, ValidationError

from engine_service.core._errors import shown
from engine_service.core._text import clean_text

MAX_PATTERN_CHARS = 4096
# A program bigger than this (e.g. ``(a{1000}){1000}``) is refused rather than built.
_MAX_MEM = 8 << 20
_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Keywords whose values are data, not schemas: a "pattern" inside them is not a regex.
_DATA_KEYWORDS = frozenset(("const", "enum", "default", "examples"))


class PatternError(ValueError):
    """A pattern RE2 will not run; the message says which and why."""


# Like re's own cache. Each program may grow its DFA cache up to _MAX_MEM while matching, so the
# cache stays small enough that even a tenant cycling through hostile patterns bounds the memory.
@functools.lru_cache(maxsize=128)
def compile_pattern(pattern: str, *, ignore_case: bool = False) -> re2._Regexp[str]:
    """``pattern`` compiled by RE2 (cached), or `PatternError` with RE2's reason."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"the pattern is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}")
    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to stderr
    options.max_mem = _MAX_MEM
    options.case_sensitive = not ignore_case
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        raise PatternError(_reason(pattern, exc)) from None
    except (TypeError, ValueError, UnicodeError) as exc:
        raise PatternError(f"not a usable pattern: {exc}") from None


def _reason(pattern: str, exc: re2.error) -> str:
    detail = exc.args[0] if exc.args else str(exc)
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    backreference = detail.startswith("invalid escape sequence: \\") and detail[-1:].isdigit()
    if "invalid perl operator" in detail or backreference:
        detail += " (backreferences, lookahead, lookbehind and atomic groups are not supported)"
    return f"not a supported regular expression (RE2 syntax): {detail}"


def search(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).search(clean_text(text)) is not None


def fullmatch(pattern: str, text: str) -> bool:
    return compile_pattern(pattern).fullmatch(clean_text(text)) is not None


def check_patterns(patterns: list[str] | None) -> None:
    """`PatternError` naming the first of ``patterns`` RE2 refuses."""
    for pattern in patterns or ():
        try:
            compile_pattern(pattern)
        except PatternError as exc:
            raise PatternError(f"{shown(pattern)!r}: {exc}") from None


# -- JSON Schema ---------------------------------------------------------------------------------


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search_or_fail(pattern, instance):
        yield ValidationError(f"{shown(instance)!r} does not match {shown(pattern)!r}")


def _pattern_properties(
    validator: Any, properties: dict[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in properties.items():
        for key, value in instance.items():
            if _search_or_fail(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, extra: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in properties and not any(_search_or_fail(p, key) for p in patterns)
    ]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        listed = ", ".join(repr(shown(k)) for k in sorted(extras)[:5])
        yield ValidationError(f"additional properties are not allowed ({listed} unexpected)")


def _search_or_fail(pattern: str, text: str) -> bool:
    try:
        return search(pattern, text)
    except PatternError:
        # check_schema refuses such schemas; one that skipped it matches nothing.
        return False


SchemaValidator: Any = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
    },
)


def check_schema(schema: Any) -> None:
    """`jsonschema.SchemaError` unless ``schema`` is a Draft 2020-12 schema RE2 can evaluate."""
    problem = _schema_problem(schema)
    if problem is not None:
        raise jsonschema.SchemaError(problem)
    Draft202012Validator.check_schema(schema)


def _schema_problem(schema: Any) -> str | None:
    stack: list[tuple[Any, str]] = [(schema, "")]
    has_pattern_properties = has_unevaluated = False
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{where}/{i}") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            path = f"{where}/{key}"
            if key in _DATA_KEYWORDS:
                continue
            if key == "pattern" and isinstance(value, str):
                if problem := _pattern_problem(value):
                    return f"{path}: {problem}"
            elif key == "patternProperties" and isinstance(value, dict):
                has_pattern_properties = True
                for pattern in value:
                    if problem := _pattern_problem(pattern):
                        return f"{path}: {problem}"
            elif key == "unevaluatedProperties":
                has_unevaluated = True
            elif key == "$schema" and isinstance(value, str) and value.rstrip("#") != _DIALECT:
                return f"{path}: only JSON Schema Draft 2020-12 is supported, not {shown(value)!r}"
            stack.append((value, path))
    if has_pattern_properties and has_unevaluated:
        return "unevaluatedProperties cannot be combined with patternProperties"
    return None


def _pattern_problem(pattern: str) -> str | None:
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return f"{shown(pattern)!r}: {exc}"
    return None

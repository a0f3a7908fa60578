"""A strict check of JSON documents against the official Anthropic SDK's request TypedDicts."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import typing_extensions


def problems(value: Any, annotation: Any, where: str = "body") -> list[str]:
    """Why ``value`` is not a valid ``annotation`` of the SDK's request types (empty: it is).

    Stricter than the API needs to be: a key a TypedDict does not declare is a problem, so a
    ``cache_control`` in a place the API does not take one is caught."""
    origin = typing_extensions.get_origin(annotation)
    if origin in (typing_extensions.Required, typing_extensions.NotRequired, typing_extensions.Annotated):
        return problems(value, typing_extensions.get_args(annotation)[0], where)
    if annotation is typing.Any or annotation is object:
        return []
    if origin in (typing.Union, types.UnionType):
        options = typing_extensions.get_args(annotation)
        results = [problems(value, option, where) for option in options]
        if any(not p for p in results):
            return []
        # Report against the alternative whose "type" matches, else all of them.
        matching = [p for option, p in zip(options, results, strict=True) if _type_matches(value, option)]
        return matching[0] if matching else [f"{where}: matches none of {len(options)} alternatives"]
    if origin is typing_extensions.Literal:
        return (
            []
            if value in typing_extensions.get_args(annotation)
            else [f"{where}: {value!r} not in {annotation}"]
        )
    if annotation is type(None):
        return [] if value is None else [f"{where}: not null"]
    if typing_extensions.is_typeddict(annotation):
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        hints = typing_extensions.get_type_hints(annotation, include_extras=True)
        found = [
            f"{where}: unknown key {key!r} for {annotation.__name__}" for key in value if key not in hints
        ]
        for key, hint in hints.items():
            hint_origin: Any = typing_extensions.get_origin(hint)
            required = key in annotation.__required_keys__ or hint_origin is typing_extensions.Required
            if key not in value:
                found += [f"{where}: missing {key!r}"] if required else []
            else:
                found += problems(value[key], hint, f"{where}.{key}")
        return found
    if origin in (list, Iterable, Sequence, typing.Iterable, typing.Sequence) or (
        origin is not None
        and isinstance(origin, type)
        and issubclass(origin, Iterable)
        and origin is not dict
    ):
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        (item,) = typing_extensions.get_args(annotation) or (typing.Any,)
        return [p for i, v in enumerate(value) for p in problems(v, item, f"{where}[{i}]")]
    if origin in (dict, Mapping, typing.Mapping):
        return [] if isinstance(value, dict) else [f"{where}: not an object"]
    if annotation is float:
        return (
            []
            if isinstance(value, int | float) and not isinstance(value, bool)
            else [f"{where}: not a number"]
        )
    if isinstance(annotation, type):
        return [] if isinstance(value, annotation) else [f"{where}: not a {annotation.__name__}"]
    return []  # an alias the checker does not know: accepted


def _type_matches(value: Any, option: Any) -> bool:
    if not (isinstance(value, dict) and typing_extensions.is_typeddict(option)):
        return False
    hint = typing_extensions.get_type_hints(option).get("type")
    while typing_extensions.get_origin(hint) in (typing_extensions.Required, typing_extensions.NotRequired):
        hint = typing_extensions.get_args(hint)[0]
    return typing_extensions.get_origin(hint) is typing_extensions.Literal and value.get(
        "type"
    ) in typing_extensions.get_args(hint)

"""Text from outside the engine, made safe to store: no lone UTF-16 surrogates.

Storage, gRPC and every JSON encoder the engine uses write UTF-8, which cannot
carry a lone surrogate (U+D800..U+DFFF on its own). Python strings can: ``json.loads``
turns a ``"\\ud83d"`` escape (an emoji cut in half by a provider, or a hostile server)
into one, and so do decoders such as ``utf-7``, ``unicode_escape`` or
``surrogateescape`` (file names that are not UTF-8). One such string in a transcript
or an event makes the checkpoint's encode raise and the run die, so untrusted JSON and
text go through this module where they enter the engine: lone surrogates become
U+FFFD, and surrogate pairs become the character they encode.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A JSON escape in the surrogate range (\ud800-\udfff). Matching a literal "\\ud8..."
# too (an escaped backslash) only sends the text down the slow path, which is harmless.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a surrogate code point (and so cannot be encoded as UTF-8)."""
    if text.isascii():  # O(1) in CPython: the common case costs nothing
        return False
    try:
        text.encode("utf-8")  # a few times faster than a regex search for [\ud800-\udfff]
    except UnicodeEncodeError:
        return True
    return False


def clean_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD and each surrogate pair joined."""
    if not has_surrogate(text):
        return text
    # UTF-16 is the encoding surrogates belong to: written out as code units, a decoder
    # joins the pairs and replaces whatever is left alone.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def clean_value(value: Any) -> Any:
    """A JSON-like value with `clean_text` applied to every string in it, keys included."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    return value


def loads_untrusted(text: str) -> Any:
    """``json.loads`` for text from outside the engine: no lone surrogate survives.

    A surrogate pair escaped in the JSON (``"\\ud83d\\ude00"``) is kept as the character
    it encodes, as ``json.loads`` does; a lone or reversed one becomes U+FFFD. Raises
    ValueError (``json.JSONDecodeError`` for bad JSON, plain ValueError for JSON nested
    too deeply to decode) and nothing else.
    """
    try:
        value = json.loads(text)
        if _SURROGATE_ESCAPE.search(text) is None and not has_surrogate(text):
            return value  # the fast path: one regex scan of text that json.loads just read
        return clean_value(value)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None

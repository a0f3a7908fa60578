"""Distinctive throwaway credentials and an "is any of them in this blob?" check.

Shared by the ApiCall secret-isolation suite and the engine-wide one (storage tree, gRPC
responses, transcripts): configure services with `SECRET_ENV` (refs → values) and pass everything
the system produced through `assert_no_secret`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from urllib.parse import quote

BEARER = "sk-SECRET-bearer-7f3a9"
BASIC_USER = "user-SECRET-basic-41c2"
BASIC_PASS = "pw-SECRET-basic-9d0e"
HEADER_VALUE = "hv-SECRET-header-5b7c"
CUSTOM_TOKEN = "tok-SECRET-custom-e21f"

# Ref names deliberately share nothing with the values, so finding a ref in output is fine.
SECRET_ENV: dict[str, str] = {
    "bearer_token": BEARER,
    "basic_user": BASIC_USER,
    "basic_pass": BASIC_PASS,
    "header_value": HEADER_VALUE,
}
RAW_SECRETS = (BEARER, BASIC_USER, BASIC_PASS, HEADER_VALUE, CUSTOM_TOKEN)
# Every value carries this marker: a hit on it alone catches partial or re-encoded leaks.
MARKER = "-SECRET-"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def secret_forms(secrets: Iterable[str] = RAW_SECRETS) -> list[str]:
    """The values plus the forms they travel in: basic auth's base64, base64 and URL-quoted."""
    values = list(secrets)
    forms = [*values, _b64(f"{BASIC_USER}:{BASIC_PASS}"), MARKER]
    forms += [_b64(v) for v in values] + [quote(v, safe="") for v in values]
    return sorted(set(forms))


def find_secrets(blob: str | bytes, forms: Iterable[str] | None = None) -> list[str]:
    """Which secret forms occur in the blob (bytes are searched as UTF-8 and Latin-1)."""
    texts = [blob] if isinstance(blob, str) else [blob.decode("utf-8", "replace"), blob.decode("latin-1")]
    return sorted({f for f in (forms or secret_forms()) for t in texts if f in t})


def assert_no_secret(blobs: Iterable[str | bytes] | str | bytes, where: str = "output") -> None:
    """Fail naming the leaked form(s) and a short excerpt of the first offending blob."""
    items = [blobs] if isinstance(blobs, str | bytes) else list(blobs)
    for index, blob in enumerate(items):
        leaked = find_secrets(blob)
        if leaked:
            text = blob if isinstance(blob, str) else blob.decode("utf-8", "replace")
            at = text.find(leaked[0]) if leaked[0] in text else 0
            excerpt = text[max(0, at - 80) : at + 80]
            raise AssertionError(f"secret {leaked} leaked in {where} item {index}: …{excerpt}…")

"""One TLS client context per trust setting, shared by the per-call HTTP clients.

ApiCall and WebFetch build a fresh ``httpx.AsyncClient`` for every call on purpose (no
cookies or connections shared between runs or tenants), but building its SSL context
(loading the CA bundle) costs ~17 ms. The context holds no per-connection state, so
those clients share one, made by httpx's own ``create_ssl_context`` (the same CA
bundle and settings a client would build itself) the first time it is needed.
"""

from __future__ import annotations

import functools
import os
import ssl

import httpx


def client_ssl_context(trust_env: bool) -> ssl.SSLContext:
    """The context an ``httpx.AsyncClient(trust_env=trust_env)`` would build, cached.

    With ``trust_env``, httpx reads ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when a client is
    built; they are part of the cache key, so a changed variable still takes effect.
    Only for HTTP/1.1 clients: httpcore sets the context's ALPN protocols on every
    connection, from the client's ``http2`` flag.
    """
    if not trust_env:
        return _context(False, None, None)
    return _context(True, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _context(trust_env: bool, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    # The arguments only key the cache: create_ssl_context reads the variables itself.
    return httpx.create_ssl_context(trust_env=trust_env)

"""The SSL context ApiCall and WebFetch share between their per-call clients."""

from __future__ import annotations

import ssl

import certifi
import pytest

from engine_service.net._tls import client_ssl_context


def test_the_context_is_built_once_per_trust_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    trusting, strict = client_ssl_context(True), client_ssl_context(False)
    assert client_ssl_context(True) is trusting
    assert client_ssl_context(False) is strict
    for ctx in (trusting, strict):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname


def test_a_ca_bundle_named_in_the_environment_counts_only_when_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    default_trusting, strict = client_ssl_context(True), client_ssl_context(False)
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    assert client_ssl_context(True) is not default_trusting  # httpx would read the variable anew
    assert client_ssl_context(False) is strict  # trust_env=False ignores it, as httpx does

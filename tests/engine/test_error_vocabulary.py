"""One error vocabulary: the ErrorInfo ``reason`` is called ``reason`` in the engine, the runner
and the client, and docs/errors.toml is the list both sides agree on."""

from __future__ import annotations

import tomllib

import grpc
import pytest

import client_py
from client_py import _errors
from engine_service import EngineError, ErrorKind
from runner_service._runner import Rejected, http_status
from tests.conftest import ROOT

ERRORS = tomllib.loads((ROOT / "docs" / "errors.toml").read_text(encoding="utf-8"))
RPC = {entry["reason"]: entry for entry in ERRORS["rpc"]}


def test_every_client_reason_is_one_the_engine_sends() -> None:
    extra = sorted(set(_errors._BY_REASON) - set(RPC))
    assert extra == [], f"the client knows reasons docs/errors.toml does not list: {extra}"


@pytest.mark.parametrize("reason", sorted(_errors._BY_REASON))
def test_a_client_reason_class_has_the_documented_status(reason: str) -> None:
    assert _errors._BY_REASON[reason].default_status == grpc.StatusCode[RPC[reason]["status"]]


def test_the_domain_and_the_client_error_call_it_reason() -> None:
    error = EngineError("ERR_RUN_NOT_FOUND", "gone", kind=ErrorKind.NOT_FOUND)
    assert error.reason == "ERR_RUN_NOT_FOUND"
    client_error = client_py.RunNotFoundError("ERR_RUN_NOT_FOUND", "gone")
    assert client_error.reason == "ERR_RUN_NOT_FOUND"


def test_code_is_a_read_only_alias_of_reason_on_the_client_error() -> None:
    error = client_py.RunNotFoundError("ERR_RUN_NOT_FOUND", "gone")
    assert error.code == error.reason
    with pytest.raises(AttributeError):
        error.code = "ERR_OTHER"  # type: ignore[misc]
    assert "deprecated" in (type(error).code.__doc__ or "").lower()


@pytest.mark.parametrize("entry", ERRORS["runner"], ids=lambda e: f"{e['reason']}-{e['http']}")
def test_the_runner_maps_each_documented_error_kind_to_its_http_status(entry: dict[str, object]) -> None:
    kind = ErrorKind[str(entry["status"])]
    assert http_status(kind) == entry["http"]
    rejected = Rejected(kind, str(entry["reason"]), "no")
    assert (rejected.reason, rejected.kind) == (entry["reason"], kind)
    assert isinstance(rejected, EngineError)  # the gRPC side answers it like any engine error

"""The engine core never imports grpc or generated code; only the servicer layer does."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SERVICER_LAYER = {"_server.py", "_convert.py", "__main__.py"}
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "machina", "google.rpc")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_core_imports_no_grpc_or_generated_code() -> None:
    offenders = {}
    for path in sorted((ROOT / "engine_service").rglob("*.py")):
        if path.name in SERVICER_LAYER and path.parent.name == "engine_service":
            continue
        bad = {
            m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN or m.startswith("google.rpc")
        }
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_client_needs_only_grpc_and_protobuf() -> None:
    allowed_third_party = {"grpc", "google"}
    for path in sorted((ROOT / "client_py").rglob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in allowed_third_party:
                assert not module.startswith("google.rpc"), f"{path.name} imports {module}"

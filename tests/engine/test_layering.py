"""Layers as folders: only ``engine_service/api/`` imports grpc or generated code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# The one layer that speaks gRPC; everything else in the engine is plain Python.
API_LAYER = ROOT / "engine_service" / "api"
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "machina")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def grpc_imports(path: Path) -> list[str]:
    """The grpc or generated-code modules ``path`` imports."""
    return sorted(
        m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN or m.startswith("google.rpc")
    )


def layer_offenders(package: Path) -> dict[str, list[str]]:
    """Modules of ``package`` outside its ``api/`` folder that import grpc or generated code."""
    offenders = {}
    for path in sorted(package.rglob("*.py")):
        if (package / "api") in path.parents:
            continue
        if bad := grpc_imports(path):
            offenders[str(path.relative_to(package))] = bad
    return offenders


def test_only_the_api_layer_imports_grpc_or_generated_code() -> None:
    assert API_LAYER.is_dir()
    assert grpc_imports(API_LAYER / "_server.py"), "the check would pass vacuously"
    assert layer_offenders(ROOT / "engine_service") == {}


@pytest.mark.parametrize(
    "source",
    [
        "import grpc\n",
        "from grpc import aio\n",
        "from machina.engine.v1 import run_pb2\n",
        "from google.rpc import status_pb2\n",
        "def f():\n    import grpc_status.rpc_status\n",
    ],
)
def test_the_layering_check_fails_on_a_violating_module(tmp_path: Path, source: str) -> None:
    package = tmp_path / "pkg"
    (package / "core").mkdir(parents=True)
    (package / "api").mkdir()
    (package / "api" / "_server.py").write_text(source, encoding="utf-8")  # allowed here
    (package / "core" / "_bad.py").write_text(source, encoding="utf-8")
    assert list(layer_offenders(package)) == ["core/_bad.py"]


def test_client_needs_only_grpc_and_protobuf() -> None:
    allowed_third_party = {"grpc", "google"}
    for path in sorted((ROOT / "client_py").rglob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in allowed_third_party:
                assert not module.startswith("google.rpc"), f"{path.name} imports {module}"

"""One public surface: ``engine_service``'s names are pinned, and the runner, the benchmarks and
the demo reach the engine only through public modules (never a private ``_module``)."""

from __future__ import annotations

import ast
import importlib

import pytest

import engine_service
from tests.conftest import ROOT

PUBLIC_NAMES = [
    "ClientToolDef",
    "ConfigError",
    "Decision",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ErrorKind",
    "LocalStorage",
    "Principal",
    "RunRecord",
    "RunSpec",
    "RunState",
    "ScriptedTurn",
    "Storage",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "load_config",
    "open_storage",
    "tool",
]

# Outside the engine's own package, these may only use its public modules.
OUTSIDERS = ("runner_service", "bench", "demo")


def test_the_public_names_are_pinned() -> None:
    assert sorted(engine_service.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(engine_service, name) is not None


@pytest.mark.parametrize("module", ["engine_service.testing", "engine_service.api.serving"])
def test_every_listed_name_of_a_public_module_exists(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def imports_of(source: str) -> set[str]:
    """Every module ``source`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def private_engine_imports(source: str) -> list[str]:
    """The private engine names ``source`` imports: a part of the dotted name after
    ``engine_service`` starts with ``_`` (``__version__`` and the like are public)."""
    return sorted(
        m
        for m in imports_of(source)
        if m.split(".")[0] == "engine_service"
        and any(part.startswith("_") and not part.startswith("__") for part in m.split(".")[1:])
    )


def test_outsiders_import_no_private_engine_module() -> None:
    offenders = {}
    for package in OUTSIDERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if bad := private_engine_imports(path.read_text(encoding="utf-8")):
                offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


@pytest.mark.parametrize(
    "source",
    [
        "from engine_service.core._engine import Engine\n",
        "import engine_service.api._server\n",
        "from engine_service.core import _types\n",
        "def f():\n    from engine_service.storage._s3 import S3Storage\n",
    ],
)
def test_the_private_import_check_fails_on_a_violation(source: str) -> None:
    assert private_engine_imports(source)


def test_public_imports_pass_the_check() -> None:
    source = "from engine_service import Engine\nfrom engine_service.testing import start_server\n"
    assert private_engine_imports(source + "from engine_service.api.serving import set_error\n") == []


def test_the_benchmarks_import_nothing_from_the_tests() -> None:
    offenders = {}
    for path in sorted((ROOT / "bench").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if bad := sorted(m for m in imports_of(text) if m.split(".")[0] == "tests"):
            offenders[str(path.relative_to(ROOT))] = bad
        if "tests." in text:  # a tool named by import path for an engine process
            offenders.setdefault(str(path.relative_to(ROOT)), []).append("a tests. import path")
    assert offenders == {}
    assert imports_of("from tests import tools\n") == {"tests", "tests.tools"}

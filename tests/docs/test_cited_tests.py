"""Every test the documentation cites exists: `tests/<path>.py` and `tests/<path>.py::name`.

SECURITY.md's "proved by" column and the README point at tests by path and name; a move or a
rename that forgets them fails here instead of leaving a claim without its proof. In a table cell,
`::name` after a cited file names another test in that file."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Where tests are cited: the docs, and the comments of files that point at the test proving them.
CITING = [
    "README.md",
    "SECURITY.md",
    "docs/errors.toml",
    "examples/ts-client/README.md",
    "justfile",
    "pyproject.toml",
    ".ci/run",
    *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "fuzz").glob("*.py"))),
    "client_py/widgets.py",
]

CITATION = re.compile(r"(tests/[\w/]+\.py)((?:::\w+)*)|`((?:::\w+)+)`")


def citations(text: str) -> list[tuple[int, str, str]]:
    """(line number, file, dotted test name or "") for each citation; a bare `::name` takes the
    file cited last on its line."""
    found: list[tuple[int, str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        current = ""
        for match in CITATION.finditer(line):
            path, names, bare = match.groups()
            if path:
                current = path
                found.append((number, path, names.removeprefix("::")))
            elif current:
                found.append((number, current, bare.removeprefix("::")))
    return found


@cache
def defined_tests(path: Path) -> frozenset[str]:
    """The test functions of a file as `name` and `Class::name`."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    names.add(f"{node.name}::{item.name}")
    return frozenset(names)


def test_the_parser_reads_files_names_and_continuations() -> None:
    line = "| x | y | `tests/a/test_b.py::test_c`, `::test_d`; see tests/e.py |"
    assert citations(line) == [
        (1, "tests/a/test_b.py", "test_c"),
        (1, "tests/a/test_b.py", "test_d"),
        (1, "tests/e.py", ""),
    ]


@pytest.mark.parametrize("doc", CITING)
def test_every_cited_test_exists(doc: str) -> None:
    missing = []
    for number, path, name in citations((ROOT / doc).read_text()):
        file = ROOT / path
        if not file.is_file():
            missing.append(f"{doc}:{number}: no file {path}")
        elif name and name not in defined_tests(file):
            missing.append(f"{doc}:{number}: no test {path}::{name}")
    assert not missing, "\n".join(missing)


def test_security_md_cites_its_proofs() -> None:
    # The parser must keep seeing the table: an empty result would make the check above vacuous.
    cited = citations((ROOT / "SECURITY.md").read_text())
    assert len({(path, name) for _, path, name in cited if name}) > 50

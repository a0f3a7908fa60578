"""How the file tools resolve a path: the run directory's real path is resolved once, and every
path the model gives is resolved whole and must land under it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine_service.tools import resolve_in_workdir
from engine_service.tools._registry import ToolError


def test_a_run_directory_swapped_for_a_symlink_does_not_move_it(tmp_path: Path) -> None:
    root = tmp_path / "work" / "ws" / "run"
    root.mkdir(parents=True)
    (root / "a.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.txt").write_text("not the run's")
    assert resolve_in_workdir(root, "a.txt") == Path(os.path.realpath(root / "a.txt"))
    # The run (say, its Bash) replaces its own directory with a link to somewhere else.
    (root / "a.txt").unlink()
    root.rmdir()
    root.symlink_to(elsewhere)
    with pytest.raises(ToolError, match="outside"):
        resolve_in_workdir(root, "a.txt")


def test_a_missing_file_resolves_and_a_loop_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    assert resolve_in_workdir(root, "new/file.txt") == Path(os.path.realpath(root)) / "new" / "file.txt"
    with pytest.raises(ToolError, match="symlink loop"):
        resolve_in_workdir(root, "loop/../x")

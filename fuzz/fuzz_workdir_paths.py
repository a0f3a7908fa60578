"""Fuzz target: model-supplied file paths (engine_service/tools/_files.py ``resolve_in_workdir``).

A run directory holds a file, a subdirectory, a FIFO, a symlink loop and symlinks pointing outside
(to a sibling "secret" directory, to /etc, and one dangling). Contract: every path is refused with
``ToolError``, or resolves to the run directory or something inside it that is missing, a regular
file or a directory — never a path outside, never a device, FIFO or socket.

Paths are drawn without lone surrogates: JSON from a model can carry them, and they make
``resolve_in_workdir`` raise UnicodeEncodeError rather than ToolError (see
tests/system/test_fuzz.py::test_validators_refuse_lone_surrogates_with_their_own_error).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import atheris
from _harness import run

with atheris.instrument_imports(include=["engine_service.tools._files"]):
    from engine_service.tools._files import resolve_in_workdir
    from engine_service.tools._registry import ToolError

BASE = Path(tempfile.mkdtemp(prefix="machina-fuzz-paths-"))
ROOT = BASE / "run"
SECRET = BASE / "secret"
PIECES = ["..", ".", "/", "sub", "file.txt", "out", "etc", "loop", "fifo", "dangling", "secret", "run",
          "/etc/passwd", str(BASE), str(ROOT), "~", "%2e%2e", "\\", "//", "sub/..", "a" * 300]  # fmt: skip


def build_tree() -> None:
    (ROOT / "sub").mkdir(parents=True)
    SECRET.mkdir()
    (SECRET / "key").write_text("secret")
    (ROOT / "file.txt").write_text("hello")
    (ROOT / "sub" / "inner.txt").write_text("inner")
    os.symlink(SECRET, ROOT / "out")
    os.symlink("/etc", ROOT / "etc")
    os.symlink(ROOT / "loop", ROOT / "loop")
    os.symlink(ROOT / "missing", ROOT / "dangling")
    os.symlink("../secret/key", ROOT / "sub" / "escape")
    os.mkfifo(ROOT / "fifo")


def inside(path: Path) -> bool:
    real_root = Path(os.path.realpath(ROOT))
    real = Path(os.path.realpath(path))
    return real == real_root or real_root in real.parents


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        parts = [fdp.PickValueInList(PIECES) for _ in range(fdp.ConsumeIntInRange(1, 6))]
        user_path = "/".join(parts) if fdp.ConsumeBool() else "".join(parts)
    else:
        user_path = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 200))
    try:
        resolved = resolve_in_workdir(ROOT, user_path)
    except ToolError:
        return
    if not inside(resolved):
        raise AssertionError(f"{user_path!r} resolved outside the run directory: {resolved}")
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise AssertionError(f"{user_path!r} resolved to a special file: {resolved}")


if __name__ == "__main__":
    build_tree()
    run(test_one_input)

"""Storage faults on a real file system: a small tmpfs that fills up, a directory made read-only
for a process without CAP_DAC_OVERRIDE (root with those capabilities dropped)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"2m"``) mounted on ``path``; skips the test where mounting is
    impossible (not root, or no mount namespace rights). CI runs as root, where it works."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory``; returns the filler file (delete it to free space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (65536, 512, 1):  # then whatever a bigger write could not use
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def as_root_without_dac_override() -> list[str]:
    """A launcher that runs a command as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH:
    a directory's mode binds it, while everything root owns (the checkout, the venv) stays
    readable — unlike ``nobody``, which cannot reach a clone under a mode-700 directory."""
    if os.geteuid() != 0:
        pytest.skip("dropping root's capabilities needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]

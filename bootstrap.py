#!/usr/bin/env python3
"""Run a `just` recipe on a machine that has only Python 3.11+ and pip.

    python3 bootstrap.py demo        # the end-to-end demo
    python3 bootstrap.py test        # the whole test suite (pytest arguments may follow)
    python3 bootstrap.py --list      # every recipe

uv and just come from PyPI. When they are not already on PATH they are installed into
`.tools/` inside the repository with `pip install --target`, which works on a system
Python that refuses installs into itself (PEP 668, "externally managed environment"),
needs no `venv` module and writes nothing outside the repository. Then `just` runs the
recipe, and uv installs everything else into `.venv/`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".tools"
BIN = TOOLS / ("Scripts" if os.name == "nt" else "bin")
REQUIREMENTS = ("uv>=0.9", "rust-just>=1.40")


def _tool(name: str) -> str | None:
    local = shutil.which(name, path=str(BIN))
    return local or shutil.which(name)


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        print(f"Machina needs Python 3.11 or newer; this is {sys.version.split()[0]}.", file=sys.stderr)
        return 2
    if _tool("uv") is None or _tool("just") is None:
        print("bootstrap: installing uv and just into .tools/ (once)", file=sys.stderr)
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        install += ["--upgrade", "--target", str(TOOLS), *REQUIREMENTS]
        done = subprocess.run(install, check=False)
        if done.returncode != 0:
            print(
                "bootstrap: pip could not install uv and just (is pip installed for this Python? "
                "On Debian/Ubuntu: apt install python3-pip).",
                file=sys.stderr,
            )
            return done.returncode
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    just = _tool("just")
    if just is None:
        print("bootstrap: just was not found after installing it into .tools/", file=sys.stderr)
        return 1
    return subprocess.run([just, *argv], cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

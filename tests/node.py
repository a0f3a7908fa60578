"""The TypeScript example client (examples/ts-client) as a real Node process, for the polyglot tests."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

TS_CLIENT = ROOT / "examples" / "ts-client"


@dataclass(frozen=True)
class NodeResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """The one JSON line src/probe.ts prints."""
        doc: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return doc


@functools.cache
def _install() -> str:
    """``npm ci`` once per test session when node_modules is missing or older than the lock.

    Returns "" when ready, else why the Node tests cannot run (as a skip reason).
    """
    if not (shutil.which("node") and shutil.which("npm")):
        return "node and npm are needed for the TypeScript client tests"
    marker = TS_CLIENT / "node_modules" / ".package-lock.json"
    lock = TS_CLIENT / "package-lock.json"
    if not marker.exists() or marker.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"],
            cwd=TS_CLIENT,
            check=True,
            capture_output=True,
            timeout=170,
        )
    return ""


def require_ts_client() -> Path:
    """The example's directory with its dependencies installed (skips when Node is absent)."""
    reason = _install()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run them: `just setup` installs Node into .venv)")
        pytest.skip(reason)
    return TS_CLIENT


def run_ts(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> NodeResult:
    """``tsx src/<script> args...`` in the example's directory, with ``env`` added to ours."""
    # NODE_EXTRA_CA_CERTS and MACHINA_* from the outer environment must not leak into a test.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MACHINA_", "NODE_EXTRA_CA"))}
    result = subprocess.run(
        [str(TS_CLIENT / "node_modules" / ".bin" / "tsx"), f"src/{script}", *args],
        cwd=TS_CLIENT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return NodeResult(result.returncode, result.stdout, result.stderr)

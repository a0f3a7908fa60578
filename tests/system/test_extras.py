"""S3 storage, MCP servers and the PostgreSQL control plane are optional extras of
machina-engine: configured without them installed, the engine stops at startup with one line
that names the extra, exit status 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Makes `import <module>` fail as it does when the package is not installed, then runs the engine.
WITHOUT = textwrap.dedent(
    """
    import sys
    sys.modules[sys.argv[1]] = None
    from engine_service.__main__ import main
    raise SystemExit(main(sys.argv[2:]))
    """
)


def _engine_without(module: str, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, module, "--listen", "127.0.0.1:0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "extra", "config"),
    [
        ("aioboto3", "s3", ""),
        ("mcp", "mcp", '[[tools.mcp_servers]]\nname = "time"\ntransport = "stdio"\ncommand = "true"\n'),
        ("asyncpg", "postgres", 'control_url = "postgresql://machina@127.0.0.1:1/machina"\n'),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(module: str, extra: str, config: str, tmp_path: Path) -> None:
    toml = tmp_path / "engine.toml"
    toml.write_text(config)
    storage = "s3://bucket/prefix" if extra == "s3" else str(tmp_path / "store")
    done = _engine_without(module, tmp_path, "--config", str(toml), "--storage", storage)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"pip install 'machina-engine[{extra}]'" in lines[0]
    assert "Traceback" not in done.stderr

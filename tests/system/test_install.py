"""The README's quick start works where users are: a system Python that refuses pip installs,
and a lock file that installs on Linux (x86_64, aarch64), macOS (arm64, x86_64) and, for the
client, Windows.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.system.uv import uv

SYSTEM_PYTHON = Path("/usr/bin/python3")
# Variables that describe the machine (its CA bundle, proxy), not the user's set-up: kept.
MACHINE_VARS = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "LANG",
    "LC_ALL",
)


def _readme_commands() -> tuple[str, str]:
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no quick-start block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2, commands
    demo, test = commands
    assert demo.endswith(" demo"), commands
    assert test.endswith(" test"), commands
    return demo, test


def _run(cmd: str, *extra: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(
        [*cmd.split(), *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{cmd} {extra} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_quick_start_on_a_system_python_that_refuses_pip_installs(tmp_path: Path) -> None:
    marker = list(SYSTEM_PYTHON.parent.parent.glob("lib/python3*/EXTERNALLY-MANAGED"))
    if not SYSTEM_PYTHON.exists() or not marker:
        if os.environ.get("CI"):
            raise AssertionError("CI installs Debian's python3, python3-pip and python3-venv (.ci/run)")
        pytest.skip("no Debian system Python with an EXTERNALLY-MANAGED marker here")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: os.environ[k] for k in MACHINE_VARS if k in os.environ}
    # A clean HOME and PATH; only uv's download cache is shared, to save fetching the same wheels.
    cache = subprocess.run([uv(), "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()
    env.update(HOME=str(home), PATH="/usr/bin:/bin", UV_CACHE_DIR=cache, PIP_NO_CACHE_DIR="1")

    # The premise: this Python refuses a plain `pip install`.
    refused = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "uv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode != 0
    assert "externally-managed-environment" in refused.stderr, refused.stderr

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    demo, test = _readme_commands()
    assert demo.split()[0] == "python3"
    system = str(SYSTEM_PYTHON)

    out = _run(demo.replace("python3", system, 1), cwd=clone, env=env, timeout=600)
    assert "final state: DONE" in out, out[-2000:]
    # The demo installs the runtime only: no test, lint or benchmark tools.
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    for dev_only in ("pytest", "mypy", "ruff", "langgraph", "moto", "playwright", "aioboto3", "mcp"):
        assert not (site / dev_only).exists(), f"{dev_only} is installed by the demo"

    # The test command, on one small file (the whole suite is what CI runs with it).
    out = _run(
        test.replace("python3", system, 1),
        "tests/engine/test_config.py",
        "-q",
        "-p",
        "no:cacheprovider",
        cwd=clone,
        env=env,
        timeout=600,
    )
    assert re.search(r"\d+ passed", out), out[-2000:]


# (platform, what is installed there, whether a source build is acceptable)
PLATFORMS = [
    ("x86_64-unknown-linux-gnu", "all", False),
    ("aarch64-unknown-linux-gnu", "all", False),
    ("aarch64-apple-darwin", "all", False),
    # Intel Macs: the newest releases of some test tools build from source there (with Xcode's tools).
    ("x86_64-apple-darwin", "all", True),
    ("x86_64-pc-windows-msvc", "client", False),
]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("platform", "what", "sdists"), PLATFORMS, ids=[p[0] for p in PLATFORMS])
def test_the_lock_installs_on_every_platform(platform: str, what: str, sdists: bool, tmp_path: Path) -> None:
    """Every locked package has a wheel for the platform (or, where allowed, a source release)."""
    requirements = tmp_path / "requirements.txt"
    export = [uv(), "export", "--frozen", "--no-hashes", "--no-header", "--quiet", "--no-emit-workspace"]
    if what == "client":
        export += ["--package", "machina-client", "--extra", "widgets"]
    else:
        export += ["--all-groups", "--all-extras"]
    subprocess.run([*export, "-o", str(requirements)], cwd=ROOT, check=True, timeout=120)
    install = [
        uv(),
        "pip",
        "install",
        "--dry-run",
        "--no-deps",
        "--python-platform",
        platform,
        "--python-version",
        "3.11",
        "--target",
        str(tmp_path / "target"),
        "-r",
        str(requirements),
    ]
    if not sdists:
        install += ["--only-binary", ":all:"]
    done = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=500, check=False)
    assert done.returncode == 0, f"{platform}:\n{done.stderr[-3000:]}"
    assert "Would install" in done.stderr, done.stderr[-2000:]

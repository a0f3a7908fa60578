"""The atheris fuzz targets under fuzz/ run for a few seconds each, so CI exercises them
(`just fuzz` runs them longer), plus regression tests for the bugs they found."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine_service.tools._apicall import normalise_path
from engine_service.tools._files import resolve_in_workdir
from engine_service.tools._registry import ToolError
from tests.conftest import ROOT

TARGETS = sorted(p.stem for p in (ROOT / "fuzz").glob("fuzz_*.py"))
SECONDS = int(os.environ.get("MACHINA_FUZZ_SECONDS", "3"))


@pytest.mark.slow
def test_every_target_is_collected() -> None:
    assert TARGETS == [
        "fuzz_apicall_path",
        "fuzz_egress_hosts",
        "fuzz_ids",
        "fuzz_script",
        "fuzz_workdir_paths",
    ]


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Start every target at once (they run side by side; each test then waits for its own)."""
    if importlib.util.find_spec("atheris") is None:
        # atheris (the `fuzz` dependency group) has wheels for Linux x86_64 only.
        if os.environ.get("CI") and sys.platform == "linux" and platform.machine() == "x86_64":
            raise AssertionError("atheris is not installed: `just test` installs the fuzz group")
        pytest.skip("atheris is not installed (Linux x86_64 only: `just sync fuzz`)")
    runs = {}
    for target in TARGETS:
        tmp = tmp_path_factory.mktemp(target)
        runs[target] = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "fuzz" / f"{target}.py"),
                f"-max_total_time={SECONDS}",
                "-timeout=10",  # seconds per input: a hang is a finding too
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
                f"-artifact_prefix={tmp}/",
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    yield runs
    # A subset (`-k`) may have waited for only some targets: stop the rest and close every pipe,
    # or the unclosed ones surface as a ResourceWarning in whichever test runs next.
    for process in runs.values():
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 60)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target: str, fuzz_runs: dict[str, subprocess.Popen[str]]) -> None:
    process = fuzz_runs[target]
    _, stderr = process.communicate(timeout=SECONDS + 50)
    tail = "\n".join(stderr.splitlines()[-25:])
    assert process.returncode == 0, f"{target} found a crash:\n{tail}"
    runs = [line for line in stderr.splitlines() if line.startswith("stat::number_of_executed_units")]
    assert runs, tail
    assert int(runs[0].split(":")[-1]) > 100, runs  # it really ran


@pytest.mark.slow
@pytest.mark.parametrize(
    "raw", ["/%25%32%65%25%32%65/secret", "/files/%25%32%66etc%25%32%66passwd", "/%25%34%31"]
)
def test_double_encoding_cannot_be_smuggled_past_normalise_path(raw: str) -> None:
    try:
        path = normalise_path(raw)
    except ToolError:
        return  # refused: fine
    assert normalise_path(path) == path  # a fixed point: what is checked is what is sent


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resolve_in_workdir", "normalise_path"])
def test_validators_refuse_lone_surrogates_with_their_own_error(which: str, tmp_path: Path) -> None:
    check: Callable[[], object] = {
        "resolve_in_workdir": lambda: resolve_in_workdir(tmp_path, "notes\ud800.txt"),
        "normalise_path": lambda: normalise_path("/items/\ud800"),
    }[which]
    with pytest.raises(ToolError):
        check()

"""Shared plumbing for the atheris fuzz targets in this folder.

Each target is a script (``python fuzz/fuzz_ids.py -max_total_time=30``) taking libFuzzer's flags.
It puts the repository root on ``sys.path`` (the targets run from any directory) and fuzzes a
parser or validator against its contract: it may refuse an input only with its own error type, and
what it accepts must satisfy the postconditions the rest of the engine relies on. Any other
exception, or a broken postcondition, is a crash that libFuzzer reports with the input that caused
it, saved as ``test-artifacts/fuzz/crash-<sha1>`` (re-run the target with that file as its argument
to replay it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(test_one_input: Callable[[bytes], None]) -> None:
    import atheris

    argv = list(sys.argv)
    if not any(arg.startswith("-artifact_prefix=") for arg in argv):
        artifacts = ROOT / "test-artifacts" / "fuzz"
        artifacts.mkdir(parents=True, exist_ok=True)
        argv.insert(1, f"-artifact_prefix={artifacts}/")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()

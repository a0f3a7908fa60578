"""The ``uv`` executable for tests that build wheels or install the project."""

from __future__ import annotations

import os
import shutil

import pytest


def uv() -> str:
    """The path of ``uv``: a failure on CI (the bootstrap puts it on PATH), a skip elsewhere."""
    path = shutil.which("uv")
    if path is None:
        if os.environ.get("CI"):
            raise AssertionError("uv is not on PATH")
        pytest.skip("uv is not installed")
    return path

"""The code base stays `ruff` clean (the style rules live in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extras)")
    r = subprocess.run([ruff, "check", "src", "tests", "bench"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:]

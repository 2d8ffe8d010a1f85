"""The code stays typed and lint-clean: ruff and mypy --strict run as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "konnichiwa", "tests", "loadtests"],
        ["ruff", "format", "--check", "konnichiwa", "tests", "loadtests"],
        ["mypy", "--strict", "konnichiwa", "tests", "loadtests"],
        # Medium and high findings; a suppression says why on its line, before "nosec Bnnn".
        ["bandit", "--recursive", "konnichiwa", "--severity-level", "medium", "--quiet"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict", "bandit"],
)
def test_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

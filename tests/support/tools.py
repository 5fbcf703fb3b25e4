"""The command-line checkers the deploy tests run: hadolint, check-jsonschema
(both in the test extra) and promtool (Debian package prometheus)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def tool(name: str, source: str, *, optional: bool = False) -> str:
    """The tool's path, this venv's first. Without it the test fails; an
    `optional` one (not from PyPI) is skipped instead, except under CI (CI
    set), which must run every check."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is not None:
        return found
    why = f"{name} is not installed ({source})"
    if optional and not os.environ.get("CI"):
        pytest.skip(why)
    pytest.fail(why if not optional else f"{why}, and CI must run this check")


def passes(
    argv: list[str], timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a checker (in `env`, default this process's); the test fails with
    its output unless it exits 0."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    assert done.returncode == 0, (
        f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    )
    return done

"""`promtool check metrics` as a test assertion.

Without promtool the check is skipped locally but fails under CI (the
environment variable CI set), so that CI cannot pass without running it;
.ci/run installs it (Debian package `prometheus`).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def check_metrics(exposition: str) -> None:
    """Fail the test with promtool's findings on any problem (lint included)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        why = "promtool is not installed (Debian package prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, and CI must run this check")
        pytest.skip(why)
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0 or done.stdout.strip() or done.stderr.strip():
        pytest.fail(
            f"promtool check metrics (exit {done.returncode}):\n{done.stdout}{done.stderr}",
            pytrace=False,
        )

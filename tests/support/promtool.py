"""`promtool check metrics` as a test assertion.

Without promtool the check is skipped locally but fails under CI (the
environment variable CI set), so that CI cannot pass without running it;
.ci/run installs it (Debian package `prometheus`).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.support.tools import tool


def check_metrics(exposition: str) -> None:
    """Fail the test with promtool's findings on any problem (lint included)."""
    promtool = tool("promtool", "Debian package prometheus", optional=True)
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

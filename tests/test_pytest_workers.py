"""The README's test command runs the suite on pytest-xdist workers (the
addopts of pyproject.toml), and `pytest -n 0` runs it in one process, as the
README says."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.tools import passes

ROOT = Path(__file__).resolve().parents[1]
PROBE = """\
import os
from pathlib import Path


def test_where() -> None:
    Path(__file__).with_name("where").write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
"""


def where(tmp_path: Path, *options: str) -> str:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    # This test's own worker variables (PYTEST_XDIST_WORKER, ...) are not the child's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    config = ["-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT)]
    passes(
        [
            sys.executable,
            "-m",
            "pytest",
            *config,
            "-q",
            "-p",
            "no:cacheprovider",
            *options,
            str(probe),
        ],
        timeout=120,
        env=env,
    )
    return (tmp_path / "where").read_text()


def test_the_suite_runs_on_workers(tmp_path: Path) -> None:
    assert where(tmp_path).startswith("gw")


def test_n_0_runs_it_in_one_process(tmp_path: Path) -> None:
    assert where(tmp_path, "-n", "0") == "main"

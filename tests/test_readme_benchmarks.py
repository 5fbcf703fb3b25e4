"""The README's benchmark commands name scripts and options that exist: each
script answers --help, and every option the README shows for it (in its
brackets) is one its parser knows.  (Running them is for a quiet machine,
not the test suite: see README "Benchmarks".)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def benchmark_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    return [
        line.strip().removeprefix(".venv/bin/python ")
        for line in section.splitlines()
        if line.startswith("    .venv/bin/python benchmarks/")
    ]


def test_the_readme_lists_the_benchmarks() -> None:
    scripts = {line.split()[0] for line in benchmark_lines()}
    assert {
        "benchmarks/driver_bench.py",
        "benchmarks/migration_bench.py",
        "benchmarks/concurrency_bench.py",
    } <= scripts


@pytest.mark.parametrize("line", benchmark_lines())
def test_each_readme_benchmark_command_parses(line: str) -> None:
    script, *rest = line.split(maxsplit=1)
    ran = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    for option in re.findall(r"--[a-z][a-z-]*", rest[0] if rest else ""):
        assert option in ran.stdout, f"{script} has no {option}"

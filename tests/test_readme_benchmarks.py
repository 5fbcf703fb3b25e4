"""The benchmark commands of the README and of benchmarks/*.md name scripts
and options that exist: each script answers --help, and every option a page
shows for it (in its brackets or not) is one its parser knows.  (Running them
is for a quiet machine, not the test suite: see README "Benchmarks".)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def commands(text: str) -> list[str]:
    return [
        line.strip().removeprefix(".venv/bin/python ")
        for line in text.splitlines()
        if line.startswith("    .venv/bin/python benchmarks/")
    ]


def benchmark_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return commands(text.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0])


def page_lines() -> list[str]:
    """The commands of the benchmarks' own pages (benchmarks/*.md)."""
    return [
        c for page in sorted((ROOT / "benchmarks").glob("*.md")) for c in commands(page.read_text())
    ]


def test_the_readme_lists_the_benchmarks() -> None:
    scripts = {line.split()[0] for line in benchmark_lines()}
    assert {
        "benchmarks/driver_bench.py",
        "benchmarks/migration_bench.py",
        "benchmarks/concurrency_bench.py",
    } <= scripts


def test_the_concurrency_page_shows_its_command() -> None:
    assert any(c.startswith("benchmarks/concurrency_bench.py ") for c in page_lines())


@pytest.mark.parametrize("line", benchmark_lines() + page_lines())
def test_each_readme_benchmark_command_parses(line: str) -> None:
    script, *rest = line.split(maxsplit=1)
    ran = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    for option in re.findall(r"--[a-z][a-z-]*", rest[0] if rest else ""):
        assert option in ran.stdout, f"{script} has no {option}"

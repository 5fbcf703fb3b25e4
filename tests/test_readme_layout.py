"""The README's layout table ("What is here") matches the tree: every path it
names exists, and every package folder and every top-level module of the
packages has a row."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fwemu", "driver", "vfioclient", "vfioload", "grpcsvc")


def table_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## What is here", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no layout table under '## What is here'"
    paths: set[str] = set()
    for row in rows:
        first_cell = row.split("|")[1]
        paths.update(re.findall(r"`([^`]+)`", first_cell))
    return paths


def test_every_path_in_the_table_exists() -> None:
    missing = sorted(p for p in table_paths() if not (ROOT / p).exists())
    assert not missing, f"the README's layout table names paths that do not exist: {missing}"


def test_every_package_folder_and_top_level_module_has_a_row() -> None:
    named = table_paths()
    expected: set[str] = set()
    for pkg in PACKAGES:
        expected.add(f"{pkg}/")
        for child in (ROOT / pkg).iterdir():
            if child.is_dir() and (child / "__init__.py").exists() and child.name != "api":
                expected.add(f"{pkg}/{child.name}/")
            elif (
                child.suffix == ".py" and child.name != "__init__.py" and pkg in ("fwemu", "driver")
            ):
                expected.add(f"{pkg}/{child.name}")
    expected.add("driver/api/")  # the hand-written half of the API package
    # fwemu/ and driver/ are described by their parts, not by a row of their own.
    unnamed = sorted(p for p in expected - {"fwemu/", "driver/"} if p not in named)
    assert not unnamed, f"the README's layout table has no row for: {unnamed}"

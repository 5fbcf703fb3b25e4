"""The demo and benchmark commands keep working (figures are not asserted here:
benchmarks print them against a baseline measured in the same run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_migrates_and_digests_match() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fwemu.cli", "demo", "--size", "4MiB", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["equal"] and rep["source_digest"] == rep["target_digest"]
    assert rep["init_seen"] >= 1
    kinds = [k for k, _ in rep["images"]]
    assert kinds[0] == "full" and kinds[-1] == "final" and "init" in kinds


def test_benchmark_command_runs_small() -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fwemu_bench.py"),
            "--size",
            "8MiB",
            "--repeat",
            "2",
            "--vfs",
            "20",
            "--vf-size",
            "64KiB",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["save"]["image_bytes"] >= 8 << 20 and out["save"]["ratio"] > 0
    assert out["memory"]["rss_bytes"] > out["memory"]["state_bytes"]

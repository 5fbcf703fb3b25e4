"""The precopy-info benchmarks run to their end: each for a moment (the
figures mean nothing at these durations; they are for a quiet machine, README
"Benchmarks"), so that a change to what they share (driver_bench's callers,
the devices they need) cannot leave one of them broken unnoticed, as
metrics_bench and tls_bench were when the callers became one per device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BRIEF = ["--seconds", "0.05", "--rounds", "1", "--json"]


def run(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, *BRIEF],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, object] = json.loads(done.stdout)
    return out


@pytest.mark.parametrize(
    ("script", "args", "key"),
    [
        ("driver_bench.py", ["--only", "precopy-info"], "precopy_info"),
        ("metrics_bench.py", [], "remote_firmware_in_flight_16"),
        ("tls_bench.py", ["--only", "precopy-info"], "precopy_info"),
    ],
)
def test_a_precopy_info_benchmark_runs_and_reports(script: str, args: list[str], key: str) -> None:
    out = run(script, *args)
    assert key in json.dumps(out), sorted(out)

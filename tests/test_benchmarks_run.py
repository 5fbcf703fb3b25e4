"""The precopy-info benchmarks run to their end: each for a moment (the
figures mean nothing at these durations; they are for a quiet machine, README
"Benchmarks"), so that a change to what they share (driver_bench's callers,
the devices they need) cannot leave one of them broken unnoticed, as
metrics_bench and tls_bench were when the callers became one per device."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BRIEF = ["--seconds", "0.05", "--rounds", "1", "--json"]


def run(script: str, *args: str, brief: Sequence[str] = BRIEF) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, *brief],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout)
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


def test_the_concurrency_benchmark_runs_and_counts_each_partys_cpu() -> None:
    """Two migrations at once, for a moment: the point reports each party's
    CPU per migration (what tells whether a change made the work lighter),
    and each service's event-loop lag over the point."""
    brief = ["--counts", "1,2", "--rounds", "1", "--shapes", "processes", "--json"]
    points = run("concurrency_bench.py", brief=brief)["processes"]
    assert [p["n"] for p in points] == [1, 2]
    for p in points:
        assert p["failed"] == 0, p["errors"]
        cpu = p["cpu_ms_per_migration"]
        assert set(cpu) == {"driver", "fwemu", "clients"}
        # Every party works for a migration; a vfioctl process at least starts Python.
        assert cpu["clients"]["user_ms"] + cpu["clients"]["sys_ms"] > 10
        assert all(c["user_ms"] + c["sys_ms"] > 0 for c in cpu.values()), cpu
        lag = p["loop_lag"]
        assert set(lag) == {"driver", "fwemu"}
        for g in lag.values():
            # A point lasts well over the 50 ms between two timers of a loop.
            assert g["samples"] >= 1, lag
            assert 0 < g["p50_le_s"] <= g["p99_le_s"], lag
            assert 0 <= g["late"] <= g["samples"], lag

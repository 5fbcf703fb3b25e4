"""Services as processes for the benchmarks: grpcsvc.spawn (as in the tests),
with a psutil handle to read each one's CPU and memory; and the raw gRPC
baseline server."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

from grpcsvc import spawn
from grpcsvc.spawn import DRIVER, FWEMU

ROOT = Path(__file__).resolve().parents[1]
BASELINE = [sys.executable, str(ROOT / "benchmarks" / "baseline_server.py")]

__all__ = ["BASELINE", "DRIVER", "FWEMU", "served", "served_with_metrics"]


@contextlib.contextmanager
def served(command: list[str], *args: str) -> Iterator[tuple[psutil.Process, str]]:
    """grpcsvc.spawn.served, yielding the process as psutil sees it."""
    with spawn.served(command, *args) as (proc, target):
        yield psutil.Process(proc.pid), target


@contextlib.contextmanager
def served_with_metrics(
    command: list[str], *args: str
) -> Iterator[tuple[psutil.Process, str, str]]:
    """`served` with --metrics-listen on a free port: also yields the
    /metrics URL (the line after 'serving ...' says where it is)."""
    with spawn.served(command, "--metrics-listen", "127.0.0.1:0", *args) as (proc, target):
        yield psutil.Process(proc.pid), target, spawn.metrics_url(proc, command[-1])

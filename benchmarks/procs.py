"""Start the project's services as processes for benchmarks and tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FWEMU = [sys.executable, "-m", "fwemu.cli", "serve"]
DRIVER = [sys.executable, "-m", "driver.cli", "serve"]
BASELINE = [sys.executable, str(ROOT / "benchmarks" / "baseline_server.py")]


@contextlib.contextmanager
def served(command: list[str], *args: str) -> Iterator[tuple[psutil.Process, str]]:
    """Run a service on a free port; yields (process, HOST:PORT) once it
    announces 'serving ... on HOST:PORT'; stops it with SIGTERM."""
    proc = subprocess.Popen(
        [*command, "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving" not in line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{command} did not start: {line}{err}")
        yield psutil.Process(proc.pid), line.rsplit(" on ", 1)[1].strip()
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str], timeout: float = 10) -> None:
    """SIGTERM (a clean shutdown), SIGKILL if that takes over `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

"""A `vfio-driver serve --scenario-service` subprocess (embedded firmware) for
the vfioctl tests, and small helpers.

The driver runs in its own process so that each test process uses grpc.aio
from one event loop at a time (the CLI's asyncio.run, or the sync client's
private loop), never two at once.  The VFs have no workload (dirty rate 0):
a VF's state then only changes by migration, so digests taken after the CLI
exits (its device fds closed) still compare saved and loaded state.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vfioclient.scenario import ScenarioClient

SERVING = re.compile(r"serving \d+ devices on (\S+:\d+)")


def pci(function_id: int) -> str:
    return f"0000:81:{function_id >> 3:02x}.{function_id & 7}"


@dataclass
class Driver:
    proc: subprocess.Popen[str]
    target: str

    @classmethod
    def start(cls, *, vfs: int = 3, dirty_rate: str = "0", scenario: bool = True) -> Driver:
        cmd = [
            sys.executable, "-m", "driver.cli", "serve", "--listen", "127.0.0.1:0",
            "--vfs", str(vfs), "--size", "256KiB", "--dirty-rate", dirty_rate,
            "--loop", "asyncio", "--log-level", "warning",
        ]  # fmt: skip
        if scenario:
            cmd.append("--scenario-service")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = SERVING.search(line)
            if m:
                return cls(proc, m.group(1))
        proc.kill()
        raise RuntimeError("vfio-driver did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def digests(self, *vhca_ids: int) -> list[str]:
        """The VFs' digests over the Scenario service (a short-lived loop)."""

        async def go() -> list[str]:
            async with await ScenarioClient.connect(self.target) as s:
                return [await s.digest(v) for v in vhca_ids]

        return asyncio.run(go())


@pytest.fixture(name="driver")
def driver_fixture() -> Iterator[Driver]:
    """A fresh driver (3 VFs, no workload) per test."""
    d = Driver.start()
    try:
        yield d
    finally:
        d.stop()

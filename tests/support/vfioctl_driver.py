"""A `vfio-driver serve --scenario-service` process (embedded firmware) for
the vfioctl and sync client tests.

The driver runs in its own process so that each test process uses grpc.aio
from one event loop at a time (the CLI's asyncio.run, or the sync client's
private loop), never two at once.  The VFs have no workload (dirty rate 0):
a VF's state then only changes by migration, so digests taken after the CLI
exits (its device fds closed) still compare saved and loaded state.  It logs
errors only: its stderr is a pipe read when it stops.  In the mTLS pass
(tests/support/tls_mode.py) it requires client certificates; `vfioctl` and
the library present the admin's from VFIO_TLS_*, which the session sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass

from grpcsvc.spawn import DRIVER, start, stop
from tests.support import tls_mode
from vfioclient.scenario import ScenarioClient

VFIOCTL = [sys.executable, "-m", "vfioclient.cli"]


def run_vfioctl(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`vfioctl ARGV...` as a process, as a person runs it: its exit code and output."""
    return subprocess.run([*VFIOCTL, *argv], capture_output=True, text=True, timeout=timeout)


@dataclass
class Driver:
    proc: subprocess.Popen[str]
    target: str

    @classmethod
    def start(cls, *, vfs: int = 3, dirty_rate: str = "0", scenario: bool = True) -> Driver:
        argv = [
            *DRIVER, "--listen", "127.0.0.1:0", "--vfs", str(vfs), "--size", "256KiB",
            "--dirty-rate", dirty_rate, "--loop", "asyncio", "--log-level", "error",
        ]  # fmt: skip
        if scenario:
            argv.append("--scenario-service")
        proc, target = start([*argv, *tls_mode.server_args()], "vfio-driver")
        return cls(proc, tls_mode.serving(target))

    def stop(self) -> None:
        tls_mode.stopped(self.target)
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed: nothing more to do
            stop(self.proc, 10)

    def digests(self, *vhca_ids: int) -> list[str]:
        """The VFs' digests over the Scenario service (a short-lived loop)."""

        async def go() -> list[str]:
            async with await ScenarioClient.connect(self.target) as s:
                return [await s.digest(v) for v in vhca_ids]

        return asyncio.run(go())

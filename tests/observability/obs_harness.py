"""fwemu + vfio-driver as processes with --metrics-listen, and scraping."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from grpcsvc.spawn import DRIVER, FWEMU, stop

QUIET = ("--log-level", "error", "--loop", "asyncio")
SERVING = re.compile(r"serving .* on (\S+:\d+)")
METRICS = re.compile(r"metrics on (http://\S+/metrics)")


@dataclass
class Served:
    proc: subprocess.Popen[str]
    target: str
    metrics_url: str

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return str(r.read().decode())

    async def ascrape(self) -> str:
        return await asyncio.to_thread(self.scrape)


@contextlib.contextmanager
def served(command: list[str], *args: str) -> Iterator[Served]:
    proc = subprocess.Popen(
        [*command, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *QUIET, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        serving, metrics = SERVING.search(first), METRICS.search(second)
        if serving is None or metrics is None:
            raise RuntimeError(f"{command} did not start: {first!r} {second!r}")
        yield Served(proc, serving.group(1), metrics.group(1))
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def firmware_and_driver() -> Iterator[tuple[Served, Served]]:
    with served(FWEMU, "--vfs", "0") as fw, served(DRIVER, "--firmware", fw.target) as drv:
        yield fw, drv

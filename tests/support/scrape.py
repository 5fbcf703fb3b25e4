"""fwemu and vfio-driver as processes (grpcsvc.spawn) with --metrics-listen,
and their /metrics scraped; in the run's mode (tests/support/tls_mode.py),
the metrics listener plain HTTP in both."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from grpcsvc.spawn import DRIVER, FWEMU, metrics_url
from tests.support import tls_mode

QUIET = ("--log-level", "error", "--loop", "asyncio")


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
    """The service on free ports of 127.0.0.1, its metrics included; the line
    after 'serving ...' says where the metrics are."""
    with tls_mode.served(command, "--metrics-listen", "127.0.0.1:0", *QUIET, *args) as (
        proc,
        target,
    ):
        yield Served(proc, target, metrics_url(proc, command[-1]))


@contextlib.contextmanager
def firmware_and_driver() -> Iterator[tuple[Served, Served]]:
    link = tls_mode.firmware_link_args()
    with (
        served(FWEMU, "--vfs", "0") as fw,
        served(DRIVER, "--firmware", fw.target, *link) as drv,
    ):
        yield fw, drv

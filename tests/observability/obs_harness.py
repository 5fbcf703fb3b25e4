"""fwemu + vfio-driver as processes with --metrics-listen, and scraping."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.procs import DRIVER, FWEMU, stop

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


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(exposition):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        v
        for (n, ls), v in samples(exposition).items()
        if n == name and set(labels.items()) <= set(ls)
    )


def sample_names(exposition: str) -> set[str]:
    return {name for name, _ in samples(exposition)}


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition declares, with or without samples yet
    (a labelled counter has none until its first increment)."""
    out = set()
    for fam in text_string_to_metric_families(exposition):
        out.update(fam.name + sfx for sfx in SUFFIXES.get(fam.type, ("",)))
        out.update(s.name for s in fam.samples)
    return out

"""Soak: N concurrent verified migrations, each with a REINIT, for a while,
against a `fwemu serve` process and a `vfio-driver serve --firmware` process
on it (both started with grpcsvc.spawn).  Not a test: a way to see that the
services hold steady under sustained load (issue 11).

Each of the N workers owns two VFs and migrates one to the other and back,
over and over: the firmware reconfigures the source at its first
switchover-ack (the driver answers REINIT), and the orchestrator compares the
firmware digests of source and destination while both are stopped.  Printed:
the RSS and open fds of both services at start (before any migration), at
their peak and at the end; the migrations, REINITs, digest mismatches and
other failures; and whether each service's end RSS is within 10% of its start.

    .venv/bin/python benchmarks/soak.py [--concurrency 64] [--seconds 600]
        [--size 1MiB] [--dirty-rate 256KiB] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvloop

from grpcsvc import spawn
from grpcsvc.units import byte_size
from vfioclient.client import Device, VfioClient
from vfioclient.migration import (
    DeviceMigration,
    DevicePair,
    MigrationError,
    MigrationOptions,
    at_first_ack,
    migrate,
)
from vfioclient.scenario import ScenarioClient

sys.path.insert(0, str(Path(__file__).parent))
from report import Results, add_output_flag, parser, print_results

SAMPLE_S = 0.5
# What each REINIT adds: one small queue pair, so that the device state (which
# reconfigurations only grow) stays near its size and RSS shows the services.
RECONFIG = [("QP", 64)]
RSS_TOLERANCE = 0.10


@dataclass
class Usage:
    """RSS and open fds of one service: at start, peak and end."""

    start_rss: int = 0
    start_fds: int = 0
    peak_rss: int = 0
    peak_fds: int = 0
    end_rss: int = 0
    end_fds: int = 0

    def sample(self, p: psutil.Process) -> tuple[int, int]:
        rss, fds = p.memory_info().rss, p.num_fds()
        self.peak_rss, self.peak_fds = max(self.peak_rss, rss), max(self.peak_fds, fds)
        return rss, fds


@dataclass
class Tally:
    migrations: int = 0
    reinits: int = 0
    mismatches: int = 0
    failures: Counter[str] = field(default_factory=Counter)


async def _sampler(procs: dict[str, psutil.Process], usage: dict[str, Usage]) -> None:
    while True:
        for name, p in procs.items():
            usage[name].sample(p)
        await asyncio.sleep(SAMPLE_S)


async def _worker(
    driver: str, fw: ScenarioClient, pair: tuple[Device, Device], deadline: float, tally: Tally
) -> None:
    """Migrate pair[0] to pair[1], then back, until `deadline`."""
    client = await VfioClient.connect(driver, tls=None)
    src, dst = pair
    try:
        while time.monotonic() < deadline:

            async def reconfigure(vhca: int = src.vhca_id) -> None:
                # The guest adds a queue pair: new initial data.
                await fw.reconfigure(vhca, RECONFIG)

            async def digests(
                _: DeviceMigration, s: int = src.vhca_id, d: int = dst.vhca_id
            ) -> tuple[str, str]:
                return await fw.digest(s), await fw.digest(d)

            options = MigrationOptions(digests=digests)
            at_first_ack(options, src.name, reconfigure)
            sfd = await client.open_device(src.name)
            dfd = await client.open_device(dst.name)
            try:
                report = await migrate([DevicePair(client, sfd, client, dfd, src.name)], options)
                tally.migrations += 1
                tally.reinits += len(report.reinits)
            except MigrationError as e:
                if "verification failed" in str(e):
                    tally.mismatches += 1
                else:
                    tally.failures[str(e).split(":", 1)[-1].strip()[:120]] += 1
            except Exception as e:
                tally.failures[f"{type(e).__name__}: {e}"[:120]] += 1
            finally:
                for fd in (sfd, dfd):
                    with contextlib.suppress(Exception):
                        await client.close(fd)
            src, dst = dst, src
    finally:
        await client.aclose()


async def _soak(
    driver: str, firmware: str, procs: dict[str, psutil.Process], n: int, seconds: float
) -> tuple[dict[str, Usage], Tally, float]:
    usage = {name: Usage() for name in procs}
    for name, p in procs.items():
        u = usage[name]
        u.start_rss, u.start_fds = u.sample(p)
    tally = Tally()
    fw = await ScenarioClient.connect(firmware, tls=None)
    lister = await VfioClient.connect(driver, tls=None)
    try:
        devices = [d for d in await lister.list_devices() if d.migratable]
    finally:
        await lister.aclose()
    if len(devices) < 2 * n:
        raise SystemExit(f"{len(devices)} migratable devices, {2 * n} needed")
    sampler = asyncio.create_task(_sampler(procs, usage))
    t0 = time.monotonic()
    try:
        deadline = t0 + seconds
        pairs = [(devices[2 * i], devices[2 * i + 1]) for i in range(n)]
        await asyncio.gather(*(_worker(driver, fw, pair, deadline, tally) for pair in pairs))
    finally:
        wall = time.monotonic() - t0
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await fw.aclose()
    await asyncio.sleep(2.0)  # clients gone: let the services release what they held
    for name, p in procs.items():
        u = usage[name]
        u.end_rss, u.end_fds = u.sample(p)
    return usage, tally, wall


def soak(n: int, seconds: float, size: int, dirty_rate: int) -> dict[str, Any]:
    quiet = ("--log-level", "warning")
    fw_args = ("--vfs", str(2 * n), "--size", str(size), "--dirty-rate", str(dirty_rate))
    with contextlib.ExitStack() as stack:  # the driver needs the firmware's address first
        fw_proc, fw_target = stack.enter_context(spawn.served(spawn.FWEMU, *fw_args, *quiet))
        drv_proc, target = stack.enter_context(
            spawn.served(spawn.DRIVER, "--firmware", fw_target, *quiet)
        )
        procs = {"fwemu": psutil.Process(fw_proc.pid), "vfio-driver": psutil.Process(drv_proc.pid)}
        usage, tally, wall = uvloop.run(_soak(target, fw_target, procs, n, seconds))
    services = {}
    for name, u in usage.items():
        services[name] = {
            **vars(u),
            "end_rss_within_10pct": abs(u.end_rss - u.start_rss) <= RSS_TOLERANCE * u.start_rss,
        }
    return {
        "concurrency": n,
        "seconds": wall,
        "vf_bytes": size,
        "migrations": tally.migrations,
        "reinits": tally.reinits,
        "mismatches": tally.mismatches,
        "failures": sum(tally.failures.values()),
        "failure_kinds": dict(tally.failures.most_common(10)),
        "services": services,
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def text(r: Results) -> Iterator[str]:
    yield (
        f"soak: {r['concurrency']} concurrent migrations of {_mib(r['vf_bytes'])} VFs for "
        f"{r['seconds']:.0f} s: {r['migrations']} migrations ({r['reinits']} REINITs), "
        f"{r['mismatches']} digest mismatches, {r['failures']} failures"
    )
    for why, count in r["failure_kinds"].items():
        yield f"  {count} x {why}"
    for name, u in r["services"].items():
        yield (
            f"  {name:<11} RSS start {_mib(u['start_rss'])}, peak {_mib(u['peak_rss'])}, "
            f"end {_mib(u['end_rss'])}; fds start {u['start_fds']}, peak {u['peak_fds']}, "
            f"end {u['end_fds']}; end RSS within 10% of start: "
            + ("yes" if u["end_rss_within_10pct"] else "no")
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--concurrency", type=int, default=64, metavar="N")
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--size", type=byte_size, default=1 << 20, help="state per VF")
    p.add_argument("--dirty-rate", type=byte_size, default=256 << 10, metavar="BYTES_PER_S")
    add_output_flag(p)
    args = p.parse_args(argv)
    if args.concurrency < 1 or not args.seconds > 0:
        p.error("--concurrency and --seconds must be positive")
    r = soak(args.concurrency, args.seconds, args.size, args.dirty_rate)
    return print_results(r, args.json, text)


if __name__ == "__main__":
    sys.exit(main())

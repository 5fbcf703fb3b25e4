"""vfio-driver benchmarks, each against a baseline measured in the same run.
Every service runs in its own process: fwemu, vfio-driver, and the baseline
(benchmarks/baseline_server.py: the same messages, nothing behind them).

(a) STOP_COPY read throughput of a 1 GiB VF through the driver with bulk reads
    (ReadStream, 1 MiB chunks): time from SET STOP_COPY to the last byte, over
    the baseline streaming the same bytes in the same chunks.  Each of --repeat
    rounds (default 5) reads through the driver and the baseline back to back
    (all served throughout), so a change in the machine's load reaches both;
    the ratio is per round, the figure their median (and range).  Goal >= 0.85.
(b) VFIO_MIG_GET_PRECOPY_INFO calls per second with 1 and 16 devices in flight
    (each device in PRE_COPY, one caller per device; each call makes one
    firmware query), over the baseline's unary calls of the same messages at 1
    and 16 in flight.  Goal >= 0.5 with the firmware as a separate process
    (also measured with it embedded in the driver); the median of --rounds.
(c) The driver's peak resident memory while migrating a 1 GiB VF in chunk
    mode (source and destination on this driver), above its idle size, with
    its split at the peak into anonymous memory and shared memory segments
    (the firmware link's buffers).  The median of 3 runs, each with a fresh
    driver.  Goal <= 48 MiB.
(d) OpenDevice + CloseFd of one device with 1,000 VFs on the firmware (a
    process) over the same with 8: an open looks at its own VF only, so the
    ratio stays near 1 (listing every VF, it was about 9x with 1,000).  The
    median of --rounds, each the mean of 50 opens per firmware.

    .venv/bin/python benchmarks/driver_bench.py [--size 1GiB] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import uvloop

from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from fwemu.link.ifc import GiB, MiB
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.tls import ClientTls
from grpcsvc.units import byte_size
from vfioclient import VfioClient, VfioClientError, calls
from vfioclient.ioctls import ioctl_method
from vfioclient.uapi import MigState

sys.path.insert(0, str(Path(__file__).parent))
from procs import BASELINE, DRIVER, FWEMU, served
from report import Results, add_output_flag, parser, print_results, selected

CHUNK = 1 << 20


async def _driver_stop_copy_read(
    target: str, repeat: int, tls: ClientTls | None = None
) -> tuple[float, int]:
    """Median seconds of SET STOP_COPY plus reading the whole stream, and its bytes."""
    async with await VfioClient.connect(target, tls=tls) as c:
        (dev,) = [d for d in await c.list_devices() if d.migratable][:1]
        fd = await c.open_device(dev.name)
        times = []
        total = 0
        for _ in range(repeat):
            await c.set_state(fd, MigState.STOP)
            t0 = time.perf_counter()
            data_fd = await c.set_state(fd, MigState.STOP_COPY)
            assert data_fd is not None
            total = 0
            async for chunk in c.read_stream(data_fd, chunk_size=CHUNK):
                total += len(chunk)
            times.append(time.perf_counter() - t0)
            await c.set_state(fd, MigState.STOP)
            await c.close(data_fd)
        await c.close(fd)
        return statistics.median(times), total


async def _baseline_read(target: str, size: int, repeat: int) -> float:
    """Median seconds of reading `size` bytes.  The client does what the
    driver's reader does (_driver_stop_copy_read, through VfioClient.read_stream):
    the same multicallable and decoding (vfioclient.calls), each chunk held
    until the next arrives, so the two differ only by what serves them."""
    import grpc

    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        read_stream = calls.read_stream_method(ch)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = 0
            async for m in read_stream(pb.ReadStreamRequest(chunk_size=CHUNK, limit=size)):
                chunk = calls.chunk(m)
                n += len(chunk)
            times.append(time.perf_counter() - t0)
            assert n == size
        return statistics.median(times)


def bench_stop_copy(size: int, rounds: int) -> dict[str, Any]:
    """`rounds` rounds, each the driver's read and then the baseline's of the
    same bytes, back to back (every service served throughout): a ratio per
    round, reported as their median and range."""
    driver_s: list[float] = []
    base_s: list[float] = []
    nbytes = 0
    with (
        served(FWEMU, "--vfs", "1", "--size", str(size), "--dirty-rate", "0") as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning") as (_, drv),
        served(BASELINE) as (_, base),
    ):
        for _ in range(max(1, rounds)):
            seconds, nbytes = uvloop.run(_driver_stop_copy_read(drv, 1))
            driver_s.append(seconds)
            base_s.append(uvloop.run(_baseline_read(base, nbytes, 1)))
    ratios = [b / d for b, d in zip(base_s, driver_s, strict=True)]
    return {
        "vf_bytes": size,
        "stream_bytes": nbytes,
        "rounds": len(ratios),
        "driver_GBps": nbytes / statistics.median(driver_s) / 1e9,
        "baseline_GBps": nbytes / statistics.median(base_s) / 1e9,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "goal": ">= 0.85",
    }


async def _rate(call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await call()
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return count / (time.perf_counter() - t0)


PRECOPY_DEVICES = (1, 16)  # devices in flight in (b)


async def _driver_precopy_rates(
    target: str, seconds: float, tls: ClientTls | None = None
) -> dict[int, float]:
    """PRECOPY_INFO calls per second with 1 and 16 devices in flight: each
    device in PRE_COPY (MIG_PRECOPY_INFOv2), one worker per device calling as
    fast as it answers (calls on one device queue on its state mutex, as in
    the kernel, so in flight means devices)."""
    async with await VfioClient.connect(target, tls=tls) as c:
        devs = [d for d in await c.list_devices() if d.migratable][: max(PRECOPY_DEVICES)]
        assert len(devs) == max(PRECOPY_DEVICES), f"{len(devs)} migratable devices"
        fds: list[tuple[int, int]] = []
        for dev in devs:
            fd = await c.open_device(dev.name)
            await c.enable_precopy_info_v2(fd)
            data_fd = await c.set_state(fd, MigState.PRE_COPY)
            assert data_fd is not None
            fds.append((fd, data_fd))
        rates = {}
        for n in PRECOPY_DEVICES:
            calls = [functools.partial(c.precopy_info, data_fd) for _, data_fd in fds[:n]]
            rates[n] = await _rates_of(calls, seconds)
        for fd, data_fd in fds:
            await c.set_state(fd, MigState.RUNNING)
            await c.close(data_fd)
            await c.close(fd)
        return rates


async def _rates_of(calls: Sequence[Callable[[], Awaitable[Any]]], seconds: float) -> float:
    """Calls per second of one worker per call, each calling its own as fast as it answers."""
    stop = time.perf_counter() + seconds
    count = 0

    async def worker(call: Callable[[], Awaitable[Any]]) -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await call()
            count += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(call) for call in calls))
    return count / (time.perf_counter() - t0)


async def _baseline_precopy_rates(target: str, seconds: float) -> dict[int, float]:
    import grpc

    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pbg.VfioStub(ch)
        req = pb.PrecopyInfoRequest(fd=3, argsz=24)
        return {n: await _rate(lambda: stub.PrecopyInfo(req), n, seconds) for n in (1, 16)}


async def _baseline_stream_precopy_rates(target: str, seconds: float) -> dict[int, float]:
    """The raw stream baseline: PrecopyInfo on one Ioctl stream per worker
    (as vfioclient's lanes carry it), answered at once."""
    import grpc

    req = pb.IoctlRequest(precopy_info=pb.PrecopyInfoRequest(fd=3, argsz=24))
    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        ioctl = ioctl_method(ch)
        rates = {}
        for n in PRECOPY_DEVICES:
            lanes = [ioctl() for _ in range(n)]

            def ask(lane: Any) -> Callable[[], Awaitable[Any]]:
                async def one() -> Any:
                    await lane.write(req)
                    return await lane.read()

                return one

            rates[n] = await _rates_of([ask(lane) for lane in lanes], seconds)
            for lane in lanes:
                lane.cancel()
        return rates


def bench_precopy_info(seconds: float, rounds: int = 3) -> dict[str, Any]:
    """All services are served throughout; every round measures the baseline
    right before each driver (the embedded firmware's, the firmware process's),
    so that each ratio compares rates measured under the same load of the
    machine.  The figures are the medians of the rounds' rates and ratios."""
    vfs = ("--vfs", str(max(PRECOPY_DEVICES)), "--size", "4MiB", "--dirty-rate", "0")
    runs: dict[str, list[dict[int, float]]] = {
        "baseline": [], "embedded": [], "baseline_remote": [], "remote": [], "stream": [],
    }  # fmt: skip
    with (
        served(BASELINE) as (_, base),
        served(DRIVER, *vfs, "--log-level", "warning") as (_, embedded),
        served(FWEMU, *vfs, "--log-level", "warning") as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning") as (_, remote),
    ):
        for _ in range(max(1, rounds)):
            runs["baseline"].append(uvloop.run(_baseline_precopy_rates(base, seconds)))
            runs["embedded"].append(uvloop.run(_driver_precopy_rates(embedded, seconds)))
            runs["baseline_remote"].append(uvloop.run(_baseline_precopy_rates(base, seconds)))
            runs["stream"].append(uvloop.run(_baseline_stream_precopy_rates(base, seconds)))
            runs["remote"].append(uvloop.run(_driver_precopy_rates(remote, seconds)))
    out: dict[str, Any] = {"rounds": len(runs["baseline"])}
    for n in PRECOPY_DEVICES:
        base_n = [r[n] for r in runs["baseline"] + runs["baseline_remote"]]
        emb_ratios = [e[n] / b[n] for e, b in zip(runs["embedded"], runs["baseline"], strict=True)]
        fw_ratios = [
            f[n] / b[n] for f, b in zip(runs["remote"], runs["baseline_remote"], strict=True)
        ]
        out[f"in_flight_{n}"] = {
            "baseline_calls_per_s": statistics.median(base_n),
            "embedded_calls_per_s": statistics.median(r[n] for r in runs["embedded"]),
            "embedded_ratio": statistics.median(emb_ratios),
            "remote_firmware_calls_per_s": statistics.median(r[n] for r in runs["remote"]),
            "remote_firmware_ratio": statistics.median(fw_ratios),
            "remote_firmware_ratios": fw_ratios,
            # The same transport as the client's (one Ioctl stream per device in flight).
            "stream_baseline_calls_per_s": statistics.median(r[n] for r in runs["stream"]),
            "remote_firmware_vs_stream_ratio": statistics.median(
                f[n] / b[n] for f, b in zip(runs["remote"], runs["stream"], strict=True)
            ),
        }
    out["goal"] = ">= 0.5"
    return out


def rss_split(pid: int) -> dict[str, int]:
    """A process's resident bytes (`rss`) and their split: `anon` (heap,
    gRPC buffers), `shmem` (mapped shared memory segments: the firmware
    link's buffers), `file` (code and libraries); /proc/PID/status."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in keys:
                out[keys[parts[0]]] = int(parts[1]) * 1024  # kB
    return out


class PeakRss:
    """Samples a process's resident size in a thread: the peak, and the
    split of the sample that had it (rss_split)."""

    def __init__(self, proc: psutil.Process, interval: float = 0.005) -> None:
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                sample = rss_split(self.proc.pid)
                if sample["rss"] > self.peak:
                    self.peak, self.at_peak = sample["rss"], sample
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _migrate(target: str) -> int:
    """A plain QEMU-like migration between two devices of one driver."""
    async with await VfioClient.connect(target, tls=None) as c:
        src_dev, dst_dev = [d for d in await c.list_devices() if d.migratable][:2]
        src = await c.open_device(src_dev.name)
        dst = await c.open_device(dst_dev.name)
        await c.enable_precopy_info_v2(src)
        sfd = await c.set_state(src, MigState.PRE_COPY)
        assert sfd is not None
        await c.set_state(dst, MigState.STOP)
        rfd = await c.set_state(dst, MigState.RESUMING)
        assert rfd is not None
        moved = 0

        async def precopy_chunks() -> Any:
            nonlocal moved
            while True:
                info = await c.precopy_info(sfd)
                if info.initial_bytes == 0:
                    return
                try:
                    data = await c.read(sfd, CHUNK)
                except VfioClientError:
                    await asyncio.sleep(0.001)
                    continue
                moved += len(data)
                yield data

        await c.write(rfd, precopy_chunks())
        await c.set_state(src, MigState.STOP_COPY)

        async def stop_copy_chunks() -> Any:
            nonlocal moved
            async for chunk in c.read_stream(sfd, chunk_size=CHUNK):
                moved += len(chunk)
                yield chunk

        await c.write(rfd, stop_copy_chunks())
        await c.set_state(src, MigState.STOP)
        await c.set_state(dst, MigState.RUNNING)
        for fd in (sfd, rfd, src, dst):
            await c.close(fd)
        return moved


def _memory_run(size: int) -> dict[str, Any]:
    """One migration on a fresh driver: its idle and peak resident memory."""
    with (
        served(FWEMU, "--vfs", "2", "--size", str(size), "--dirty-rate", "0") as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning") as (drv_proc, drv),
    ):
        time.sleep(0.3)
        idle = rss_split(drv_proc.pid)
        with PeakRss(drv_proc) as peak:
            moved = uvloop.run(_migrate(drv))
    above = {k: peak.at_peak[k] - idle[k] for k in ("rss", "anon", "shmem")}
    return {"moved": moved, "idle": idle["rss"], "peak": peak.peak, "above": above}


def bench_memory(size: int, runs: int = 3) -> dict[str, Any]:
    """The median of `runs` migrations (by the peak above idle), each on a
    fresh driver, and the anonymous / shared memory split of that run's peak."""
    results = sorted(
        (_memory_run(size) for _ in range(max(1, runs))), key=lambda r: r["above"]["rss"]
    )
    med = results[len(results) // 2]
    return {
        "vf_bytes": size,
        "moved_bytes": med["moved"],
        "runs": len(results),
        "idle_rss_bytes": med["idle"],
        "peak_rss_bytes": med["peak"],
        "above_idle_bytes": med["above"]["rss"],
        "above_idle_anon_bytes": med["above"]["anon"],
        "above_idle_shmem_bytes": med["above"]["shmem"],
        "above_idle_each_bytes": [r["above"]["rss"] for r in results],
        "goal_bytes": 48 * MiB,
        "met": med["above"]["rss"] <= 48 * MiB,
    }


OPEN_VFS = (8, 1000)
OPENS = 50


async def _open_close_s(target: str, opens: int) -> float:
    """The mean time of OpenDevice + CloseFd, over the firmware's first 8 VFs."""
    async with await VfioClient.connect(target, tls=None) as c:
        names = [d.name for d in await c.list_devices()][:8]
        for name in names:  # each probed once before timing
            await c.close(await c.open_device(name))
        t = time.perf_counter()
        for i in range(opens):
            await c.close(await c.open_device(names[i % len(names)]))
        return (time.perf_counter() - t) / opens


def bench_open(rounds: int) -> dict[str, Any]:
    times: dict[int, list[float]] = {n: [] for n in OPEN_VFS}
    for _ in range(max(1, rounds)):
        for n in OPEN_VFS:
            with (
                served(FWEMU, "--vfs", str(n), "--size", "1MiB", "--dirty-rate", "1MiB") as (_, fw),
                served(DRIVER, "--firmware", fw, "--log-level", "warning") as (_, drv),
            ):
                times[n].append(uvloop.run(_open_close_s(drv, OPENS)))
    few, many = (statistics.median(times[n]) for n in OPEN_VFS)
    ratios = [b / a for a, b in zip(times[OPEN_VFS[0]], times[OPEN_VFS[1]], strict=True)]
    return {
        "vfs": list(OPEN_VFS),
        "rounds": len(ratios),
        "open_close_s": {str(n): statistics.median(times[n]) for n in OPEN_VFS},
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "few_s": few,
        "many_s": many,
    }


def text(out: Results) -> Iterator[str]:
    if "stop_copy" in out:
        s = out["stop_copy"]
        yield (
            f"(a) STOP_COPY read of a {s['vf_bytes'] / MiB:.0f} MiB VF, median of "
            f"{s['rounds']} rounds: driver {s['driver_GBps']:.2f} GB/s, baseline stream "
            f"{s['baseline_GBps']:.2f} GB/s, ratio {s['ratio']:.2f} (range "
            f"{min(s['ratios']):.2f}-{max(s['ratios']):.2f}) (goal >= 0.85)"
        )
    if "precopy_info" in out:
        pi = out["precopy_info"]
        for n in PRECOPY_DEVICES:
            r = pi[f"in_flight_{n}"]
            each = ", ".join(f"{x:.2f}" for x in r["remote_firmware_ratios"])
            yield (
                f"(b) precopy info, {n:>2} devices in flight (median of {pi['rounds']}): "
                f"baseline {r['baseline_calls_per_s']:.0f}/s; embedded firmware "
                f"{r['embedded_calls_per_s']:.0f}/s (ratio {r['embedded_ratio']:.2f}); firmware "
                f"process {r['remote_firmware_calls_per_s']:.0f}/s (ratio "
                f"{r['remote_firmware_ratio']:.2f}: {each}) (goal >= 0.5); against the raw "
                f"Ioctl stream {r['stream_baseline_calls_per_s']:.0f}/s, the client's own "
                f"transport: {r['remote_firmware_vs_stream_ratio']:.2f}"
            )
    if "memory" in out:
        m = out["memory"]
        each = ", ".join(f"{x / MiB:.1f}" for x in m["above_idle_each_bytes"])
        yield (
            f"(c) driver RSS migrating a {m['vf_bytes'] / MiB:.0f} MiB VF in chunk mode, median "
            f"of {m['runs']} runs: peak {m['peak_rss_bytes'] / MiB:.0f} MiB, idle "
            f"{m['idle_rss_bytes'] / MiB:.0f} MiB, {m['above_idle_bytes'] / MiB:.1f} MiB above "
            f"idle ({m['above_idle_anon_bytes'] / MiB:.1f} anonymous, "
            f"{m['above_idle_shmem_bytes'] / MiB:.1f} shared memory; runs: {each}) "
            f"(goal <= 48 MiB: {'met' if m['met'] else 'MISSED'})"
        )
    if "open" in out:
        o = out["open"]
        each = ", ".join(f"{x:.2f}" for x in o["ratios"])
        yield (
            f"(d) OpenDevice + CloseFd, median of {o['rounds']}: {o['few_s'] * 1e3:.2f} ms with "
            f"{o['vfs'][0]} VFs, {o['many_s'] * 1e3:.2f} ms with {o['vfs'][1]}: ratio "
            f"{o['ratio']:.2f} ({each})"
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--size", type=byte_size, default=1 * GiB, help="VF size for (a) and (c)")
    p.add_argument("--repeat", type=int, default=5, help="rounds of (a), median reported")
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each rate in (b)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (b) and (d), median reported")
    p.add_argument("--only", choices=["stop-copy", "precopy-info", "memory", "open"])
    add_output_flag(p)
    args = p.parse_args(argv)
    out = selected(
        args.only,
        {
            "stop-copy": lambda: bench_stop_copy(args.size, args.repeat),
            "precopy-info": lambda: bench_precopy_info(args.seconds, args.rounds),
            "memory": lambda: bench_memory(args.size),
            "open": lambda: bench_open(args.rounds),
        },
    )
    return print_results(out, args.json, text)


if __name__ == "__main__":
    sys.exit(main())

"""vfio-driver benchmarks, each against a baseline measured in the same run.
Every service runs in its own process: fwemu, vfio-driver, and the baseline
(benchmarks/baseline_server.py: the same messages, nothing behind them).

(a) STOP_COPY read throughput of a 1 GiB VF through the driver with bulk reads
    (ReadStream, 1 MiB chunks), over the baseline streaming the same bytes in
    the same chunks.  Goal >= 0.8.
(b) VFIO_MIG_GET_PRECOPY_INFO calls per second at 1 and 16 in flight (each call
    makes one firmware query), over the baseline's unary calls of the same
    messages.  Goal >= 0.5.  Measured with the firmware embedded in the driver
    and with the firmware as a separate process.
(c) The driver's peak resident memory while migrating a 1 GiB VF in chunk
    mode (source and destination on this driver), above its idle size.
    Goal < 64 MiB.

    .venv/bin/python benchmarks/driver_bench.py [--size 1GiB] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import uvloop

from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from fwemu.link.ifc import GiB, MiB
from grpcsvc.server import CHANNEL_OPTIONS
from grpcsvc.tls import ClientTls
from grpcsvc.units import byte_size
from vfioclient import VfioClient, VfioClientError
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
    import grpc

    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pbg.VfioStub(ch)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = 0
            async for m in stub.ReadStream(pb.ReadStreamRequest(chunk_size=CHUNK, limit=size)):
                n += len(m.data)
            times.append(time.perf_counter() - t0)
            assert n == size
        return statistics.median(times)


def bench_stop_copy(size: int, repeat: int) -> dict[str, Any]:
    with (
        served(FWEMU, "--vfs", "1", "--size", str(size), "--dirty-rate", "0") as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning") as (_, drv),
    ):
        seconds, nbytes = uvloop.run(_driver_stop_copy_read(drv, repeat))
    with served(BASELINE) as (_, base):
        base_s = uvloop.run(_baseline_read(base, nbytes, repeat))
    return {
        "vf_bytes": size,
        "stream_bytes": nbytes,
        "driver_GBps": nbytes / seconds / 1e9,
        "baseline_GBps": nbytes / base_s / 1e9,
        "ratio": base_s / seconds,
        "goal": ">= 0.8",
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


async def _driver_precopy_rates(
    target: str, seconds: float, tls: ClientTls | None = None
) -> dict[int, float]:
    """PRECOPY_INFO calls per second on one device, at 1 and 16 in flight."""
    async with await VfioClient.connect(target, tls=tls) as c:
        (dev,) = [d for d in await c.list_devices() if d.migratable][:1]
        fd = await c.open_device(dev.name)
        await c.enable_precopy_info_v2(fd)
        data_fd = await c.set_state(fd, MigState.PRE_COPY)
        assert data_fd is not None
        rates = {n: await _rate(lambda: c.precopy_info(data_fd), n, seconds) for n in (1, 16)}
        await c.set_state(fd, MigState.RUNNING)
        await c.close(data_fd)
        await c.close(fd)
        return rates


async def _baseline_precopy_rates(target: str, seconds: float) -> dict[int, float]:
    import grpc

    async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as ch:
        stub = pbg.VfioStub(ch)
        req = pb.PrecopyInfoRequest(fd=3, argsz=24)
        return {n: await _rate(lambda: stub.PrecopyInfo(req), n, seconds) for n in (1, 16)}


def bench_precopy_info(seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with served(BASELINE) as (_, base):
        baseline = uvloop.run(_baseline_precopy_rates(base, seconds))
    with served(DRIVER, "--vfs", "1", "--size", "4MiB", "--dirty-rate", "0",
                "--log-level", "warning") as (_, drv):  # fmt: skip
        embedded = uvloop.run(_driver_precopy_rates(drv, seconds))
    with (
        served(FWEMU, "--vfs", "1", "--size", "4MiB", "--dirty-rate", "0") as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning") as (_, drv),
    ):
        remote = uvloop.run(_driver_precopy_rates(drv, seconds))
    for n in (1, 16):
        out[f"in_flight_{n}"] = {
            "baseline_calls_per_s": baseline[n],
            "embedded_calls_per_s": embedded[n],
            "embedded_ratio": embedded[n] / baseline[n],
            "remote_firmware_calls_per_s": remote[n],
            "remote_firmware_ratio": remote[n] / baseline[n],
        }
    out["goal"] = ">= 0.5"
    return out


class PeakRss:
    """Samples a process's resident size in a thread."""

    def __init__(self, proc: psutil.Process, interval: float = 0.005) -> None:
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
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


def bench_memory(size: int) -> dict[str, Any]:
    with (
        served(FWEMU, "--vfs", "2", "--size", str(size), "--dirty-rate", "0") as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning") as (drv_proc, drv),
    ):
        time.sleep(0.3)
        idle = int(drv_proc.memory_info().rss)
        with PeakRss(drv_proc) as peak:
            moved = uvloop.run(_migrate(drv))
    return {
        "vf_bytes": size,
        "moved_bytes": moved,
        "idle_rss_bytes": idle,
        "peak_rss_bytes": peak.peak,
        "above_idle_bytes": peak.peak - idle,
        "goal_bytes": 64 * MiB,
        "met": peak.peak - idle < 64 * MiB,
    }


def text(out: Results) -> Iterator[str]:
    if "stop_copy" in out:
        s = out["stop_copy"]
        yield (
            f"(a) STOP_COPY read of a {s['vf_bytes'] / MiB:.0f} MiB VF: driver "
            f"{s['driver_GBps']:.2f} GB/s, baseline stream {s['baseline_GBps']:.2f} GB/s, "
            f"ratio {s['ratio']:.2f} (goal >= 0.8)"
        )
    if "precopy_info" in out:
        for n in (1, 16):
            r = out["precopy_info"][f"in_flight_{n}"]
            yield (
                f"(b) precopy info, {n:>2} in flight: baseline {r['baseline_calls_per_s']:.0f}/s; "
                f"embedded firmware {r['embedded_calls_per_s']:.0f}/s "
                f"(ratio {r['embedded_ratio']:.2f}); firmware process "
                f"{r['remote_firmware_calls_per_s']:.0f}/s (ratio {r['remote_firmware_ratio']:.2f})"
                " (goal >= 0.5)"
            )
    if "memory" in out:
        m = out["memory"]
        yield (
            f"(c) driver RSS migrating a {m['vf_bytes'] / MiB:.0f} MiB VF in chunk mode: peak "
            f"{m['peak_rss_bytes'] / MiB:.0f} MiB, idle {m['idle_rss_bytes'] / MiB:.0f} MiB, "
            f"{m['above_idle_bytes'] / MiB:.1f} MiB above idle (goal < 64 MiB: "
            f"{'met' if m['met'] else 'MISSED'})"
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--size", type=byte_size, default=1 * GiB, help="VF size for (a) and (c)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each rate in (b)")
    p.add_argument("--only", choices=["stop-copy", "precopy-info", "memory"])
    add_output_flag(p)
    args = p.parse_args(argv)
    out = selected(
        args.only,
        {
            "stop-copy": lambda: bench_stop_copy(args.size, args.repeat),
            "precopy-info": lambda: bench_precopy_info(args.seconds),
            "memory": lambda: bench_memory(args.size),
        },
    )
    return print_results(out, args.json, text)


if __name__ == "__main__":
    sys.exit(main())

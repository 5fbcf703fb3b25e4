"""fwemu benchmarks, each against a baseline measured in the same run.

(a) SAVE throughput: a `fwemu serve` process saves a VF (default 256 MiB) into
    driver-owned shared memory; time from SaveVhcaState to its completion,
    over a plain memcpy of the same size in this process.  Goal >= 0.25.
(b) Memory: resident size of one `fwemu serve` holding 1,000 VFs of 1 MiB,
    next to the state it holds and to an idle fwemu.  Goal < 1.5 GiB.
(c) Workload: the page writes a VF's guest workload owes when it is first
    looked at after idling (32,768 at most, as after 128 s at 1 MiB/s) are
    performed on fwemu's one thread, in the way of every other command; their
    rate in Workload.run over the plain loop (`plain_writes`, rng.randrange
    per write, what Workload.run was), which writes the same pages.

    .venv/bin/python benchmarks/fwemu_bench.py            # all, full size
    .venv/bin/python benchmarks/fwemu_bench.py --json     # machine-readable
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import uvloop

from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import PAGE_SIZE, GiB, KiB, MiB, SaveCompletion
from fwemu.model.device_state import DeviceState
from fwemu.model.workload import MAX_WRITES_PER_RUN, Workload
from grpcsvc.units import byte_size

sys.path.insert(0, str(Path(__file__).parent))
from procs import FWEMU, served
from report import Results, add_output_flag, parser, print_results, selected


def fwemu_process(*args: str) -> contextlib.AbstractContextManager[tuple[psutil.Process, str]]:
    return served(FWEMU, "--log-level", "warning", *args)


def memcpy_seconds(size: int, repeat: int) -> float:
    src = bytearray(os.urandom(1 << 20)) * (size >> 20) if size >= 1 << 20 else bytearray(size)
    dst = bytearray(len(src))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst[:] = src
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def save_seconds(target: str, size: int, repeat: int) -> tuple[float, int]:
    link = await GrpcLink.connect(target, memory="shm")
    try:
        (vf,) = await link.list_vfs()
        q = await link.query_vhca_migration_state(vf.vhca_id)
        buf = await link.alloc_buffer(q.required_umem_size)
        times = []
        image = 0
        for _ in range(repeat):
            done: asyncio.Future[SaveCompletion] = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            r = await link.save_vhca_state(
                vf.vhca_id,
                mkey=buf.mkey,
                size=buf.length,
                set_track=True,
                callback=done.set_result,
            )
            assert r.ok, r
            c = await done
            times.append(time.perf_counter() - t0)
            assert c.status == 0, c
            image = c.actual_image_size
        await link.free_buffer(buf)
        return statistics.median(times), image
    finally:
        await link.close()


def bench_save(size: int, repeat: int) -> dict[str, Any]:
    with fwemu_process("--vfs", "1", "--size", str(size), "--dirty-rate", "0") as (_, target):
        seconds, image = uvloop.run(save_seconds(target, size, repeat))
    base = memcpy_seconds(size, repeat)
    return {
        "vf_bytes": size,
        "image_bytes": image,
        "save_s": seconds,
        "save_GBps": image / seconds / 1e9,
        "memcpy_s": base,
        "memcpy_GBps": size / base / 1e9,
        "ratio": (image / seconds) / (size / base),
        "goal": ">= 0.25",
    }


def rss_when_serving(*args: str) -> int:
    with fwemu_process(*args) as (proc, _):
        time.sleep(0.3)  # let the allocator settle
        return int(proc.memory_info().rss)


def bench_memory(vfs: int, vf_size: int) -> dict[str, Any]:
    idle = rss_when_serving("--vfs", "0")
    loaded = rss_when_serving("--vfs", str(vfs), "--size", str(vf_size))
    state = vfs * vf_size
    return {
        "vfs": vfs,
        "vf_bytes": vf_size,
        "state_bytes": state,
        "idle_rss_bytes": idle,
        "rss_bytes": loaded,
        "overhead_over_state": (loaded - idle) / state,
        "goal_bytes": int(1.5 * GiB),
        "met": loaded < 1.5 * GiB,
    }


_STAMP = struct.Struct("<Q")


def plain_writes(seed: int, arena: bytearray, writes: int) -> list[int]:
    """Workload.run's writes as it first made them (rng.randrange per write,
    the stamp's slot from the page's room): the pages written, in order."""
    rng = random.Random(seed ^ 0x5EED_D1B7)
    size = len(arena)
    npages = -(-size // PAGE_SIZE)
    pages = []
    for counter in range(1, writes + 1):
        page = rng.randrange(npages)
        base = page * PAGE_SIZE
        room = min(PAGE_SIZE, size - base)
        if room >= _STAMP.size:
            slot = (counter * _STAMP.size) % (room - room % _STAMP.size)
            _STAMP.pack_into(arena, base + slot, counter)
        else:
            arena[base] = counter & 0xFF
        pages.append(page)
    return pages


def bench_workload(vf_size: int, repeat: int) -> dict[str, Any]:
    writes = MAX_WRITES_PER_RUN
    runs, plains = [], []
    for r in range(repeat):
        state = DeviceState(bytearray(vf_size), [], 0)
        t = time.perf_counter()
        Workload(r, 1 * MiB, now=0.0).run(state, writes)
        runs.append(time.perf_counter() - t)
        arena = bytearray(vf_size)
        t = time.perf_counter()
        plain_writes(r, arena, writes)
        plains.append(time.perf_counter() - t)
    run_s, plain_s = statistics.median(runs), statistics.median(plains)
    return {
        "vf_bytes": vf_size,
        "writes": writes,
        "run_s": run_s,
        "plain_s": plain_s,
        "writes_per_s": writes / run_s,
        "plain_writes_per_s": writes / plain_s,
        "ratio": plain_s / run_s,
    }


def text(out: Results) -> Iterator[str]:
    if "save" in out:
        s = out["save"]
        yield (
            f"(a) SAVE of a {s['vf_bytes'] / MiB:.0f} MiB VF into shared memory: "
            f"{s['save_GBps']:.2f} GB/s; memcpy {s['memcpy_GBps']:.2f} GB/s; "
            f"ratio {s['ratio']:.2f} (goal >= 0.25)"
        )
    if "memory" in out:
        m = out["memory"]
        yield (
            f"(b) fwemu with {m['vfs']} VFs of {m['vf_bytes'] / KiB:.0f} KiB: RSS "
            f"{m['rss_bytes'] / GiB:.2f} GiB (state {m['state_bytes'] / GiB:.2f} GiB, idle "
            f"{m['idle_rss_bytes'] / MiB:.0f} MiB, {m['overhead_over_state']:.2f}x state); "
            f"goal < 1.50 GiB: {'met' if m['met'] else 'MISSED'}"
        )
    if "workload" in out:
        w = out["workload"]
        yield (
            f"(c) an idle {w['vf_bytes'] / MiB:.0f} MiB VF's first look, {w['writes']} page "
            f"writes: {w['run_s'] * 1000:.1f} ms ({w['writes_per_s'] / 1e6:.2f} M/s); the plain "
            f"loop {w['plain_s'] * 1000:.1f} ms; {w['ratio']:.2f}x its rate"
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--size", type=byte_size, default=256 * MiB, help="VF size for (a)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--vfs", type=int, default=1000, help="VFs for (b)")
    p.add_argument("--vf-size", type=byte_size, default=1 * MiB, help="VF size for (b)")
    p.add_argument("--only", choices=["save", "memory", "workload"])
    add_output_flag(p)
    args = p.parse_args(argv)
    out = selected(
        args.only,
        {
            "save": lambda: bench_save(args.size, args.repeat),
            "memory": lambda: bench_memory(args.vfs, args.vf_size),
            "workload": lambda: bench_workload(16 * MiB, args.repeat),
        },
    )
    return print_results(out, args.json, text)


if __name__ == "__main__":
    sys.exit(main())

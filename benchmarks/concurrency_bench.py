"""Many migrations at once on one driver: N concurrent migrations of 16 MiB
VFs (N = 1, 8, 32, 64) through a `vfio-driver serve --firmware` over a
`fwemu serve` process, as a lab runs them, in two shapes:

- processes: N `vfioctl migrate SRC DST --json` processes started at once
  (N VMs, each its own orchestrator);
- one: one orchestrator process migrating N device pairs together
  (vfioclient.migration.migrate with N pairs: one VM with N VFs, one
  switchover).

For each N, the median over --rounds rounds (default 3) of:

- throughput: the bytes the migrations moved over their window, as a ratio
  of N = 1's in the same round.  The window runs from the first state change
  of any of the point's devices to the last destination's RUNNING, as the
  driver's event stream stamps them: the migrations, not the `vfioctl`
  processes' start-up.  A lab's VMs (QEMU) are running before it migrates
  them; with the start-up in, N = 1's ~0.1 s migration would sit in ~0.5 s of
  Python start-up, and N = 64's processes share that start-up on 2 cores, so
  the ratio would mostly measure start-up amortised, not migrations.  The
  processes' wall (spawn to last exit) and their start-up (spawn to the
  device's first state change) are printed beside it: what the CLI costs.
- downtime p50 and p99 against the limit (0.3 s), and failures (with why).
- where the p99 went: for the slowest migrations of the median round, each
  step of the switchover from the driver's events (see `_steps`), and what
  the rest of the point was doing meanwhile: migrations in precopy, others
  stopped, processes still starting, and the PRECOPY_INFO answers per second
  the others' precopy loops drew (each precopy iteration is one read, one
  MIG_DATA_SIZE and one PRECOPY_INFO).
- each service's event-loop lag over the point (grpcsvc.looplag, scraped
  from its /metrics before and after): the p50 and p99 as the histogram's
  bucket bounds, and how many of its timers ran more than 0.1 s late (a
  timer every 50 ms: each is a stall of the loop of at least 0.1 s; the
  point includes the processes' start-up, when the services are idle, so
  the p99 understates the migrations' window and the count does not).
  Every call, message and firmware answer waits for that loop, so this is
  the wait a service adds to each step of a switchover.
- CPU per migration: the driver's, fwemu's and the clients' (the vfioctl
  processes, start-up included) user and system time over the point, divided
  by N.  Steadier than the p99, so it tells whether a change made the work
  lighter.  The system time also shows the machine: in a VM whose memory the
  host backs on first touch (a machine just booted), the services' first
  touches of their fresh buffer pages cost ~2.5 ms/MiB instead of ~0.35, and
  their system time doubles or more.

Issue 16's goals at N = 64: throughput >= 0.7x N = 1's, p99 downtime <= 2x
the limit.

The driver runs with its default switchover priority (README, "Switchover
priority"); `--switchover-priority 0` runs it without, for the comparison in
benchmarks/concurrency.md.

The one-process shape does not converge past N = 19 (ONE_ITERATIONS): QEMU's
rule waits for the pending bytes to fit the estimate x the limit, and
mlx5vf's MIG_DATA_SIZE is a device's whole state; meanwhile each guest
dirties --dirty-rate, which every precopy round re-reads.  Its downtime is
then one stop of N devices, their state changes one device after another as
QEMU's vmstate handlers make them.

The migrations do not verify the devices' digests (vfioctl migrate --verify
no): QEMU has no such step, and fwemu hashing 2 x 16 MiB per migration on its
one thread lands inside the other migrations' downtimes.  --verify puts it
back (`--verify yes --firmware FWEMU`), to see what it costs.

    .venv/bin/python benchmarks/concurrency_bench.py [--counts 1,8,32,64] [--rounds 3]
        [--shapes processes,one] [--verify] [--dirty-rate 1MiB]
        [--switchover-priority SECONDS] [--json]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from procs import DRIVER, FWEMU, served_with_metrics
from prometheus_client.parser import text_string_to_metric_families
from report import Results, add_output_flag, parser, print_results

from driver.api.events import PrecopyAnswered, StateChanged
from driver.priority import DEFAULT_MAX_WAIT_S, priority_wait_arg
from driver.shards import pci_name
from grpcsvc.looplag import LAG
from vfioclient import VfioClient, VfioClientError
from vfioclient.client import EventStream

SIZE = "16MiB"
DIRTY = "1MiB"
LIMIT_S = 0.3
MiB = 1 << 20
# One VM with N VFs converges only while N x 16 MiB (mlx5vf's MIG_DATA_SIZE is
# the whole device state) fits the 1 GiB/s estimate x the limit: N <= 19.
# Past that, QEMU's rule never switches over; here the orchestrator gives up
# converging after this many precopy rounds and switches over anyway
# ("converged": false), so the point has a downtime to show.
ONE_ITERATIONS = 300
RUN_TIMEOUT_S = 120.0  # a point that takes longer is reported as failed ("timeout")
SLOWEST = 3  # migrations whose steps are shown per point
VFIOCTL = [sys.executable, "-m", "vfioclient.cli"]
SHAPES = ("processes", "one")
# The FSM arcs (driver events) that mark the switchover's steps.
P2P = ("PRE_COPY>PRE_COPY_P2P", "RUNNING>RUNNING_P2P")  # the source stops
LOADED = "RESUMING>STOP"  # the destination loaded
RUNNING = "RUNNING_P2P>RUNNING"  # the destination runs

# One orchestrator, N pairs: the report of one migrate() of them all.
ONE = """
import asyncio, json, sys
from vfioclient import VfioClient, VfioClientError
from vfioclient.client import EventStream
from vfioclient.migration import DevicePair, MigrationOptions, migrate

async def main(target, names):
    c = await VfioClient.connect(target)
    pairs = []
    for i in range(0, len(names), 2):
        s, d = await c.open_device(names[i]), await c.open_device(names[i + 1])
        pairs.append(DevicePair(c, s, c, d, name=names[i]))
    options = MigrationOptions(downtime_limit_s=LIMIT_S, max_precopy_iterations=ITERATIONS)
    report = await migrate(pairs, options)
    print(report.to_json(indent=None))
    await c.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2:]))
""".replace("LIMIT_S", repr(LIMIT_S)).replace("ITERATIONS", str(ONE_ITERATIONS))


# --- the driver's events ---------------------------------------------------------------


@dataclass
class EventLog:
    """The driver's state changes and PRECOPY_INFO answers during a point."""

    # device -> (time, from state, to state) of each FSM arc it walked
    arcs: dict[str, list[tuple[float, str, str]]] = field(default_factory=lambda: defaultdict(list))
    infos: list[tuple[float, str]] = field(default_factory=list)  # (time, device)

    def at(self, device: str, *arcs: str, last: bool = False) -> float | None:
        """When `device` first (last) walked one of `arcs` ("FROM>TO"; ">TO":
        from any state)."""
        times = [
            t for t, a, b in self.arcs.get(device, ()) if f"{a}>{b}" in arcs or f">{b}" in arcs
        ]
        if not times:
            return None
        return max(times) if last else min(times)

    def latest(self, devices: list[str], *arcs: str, last: bool = False) -> float | None:
        """The latest of `at` over `devices`; None if one has not been there."""
        times = [self.at(d, *arcs, last=last) for d in devices]
        return None if None in times else max(t for t in times if t is not None)

    def first(self, device: str) -> float | None:
        arcs = self.arcs.get(device)
        return min(t for t, _, _ in arcs) if arcs else None


class Follower:
    """Follows the driver's events (as `vfioctl events` would) on a thread of
    this process, into the EventLog of the point running (`point()`).  One
    thread and event loop for the whole run: grpc.aio keeps to one loop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.log = EventLog()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._follow(),), daemon=True
        )

    async def _follow(self) -> None:
        c = await VfioClient.connect(self.target)
        try:
            stream = c.events()
            await stream.ready()
            self._ready.set()
            reader = asyncio.ensure_future(self._take(stream))
            await self._stop.wait()
            await stream.aclose()
            with contextlib.suppress(asyncio.CancelledError, VfioClientError):
                await reader
        finally:
            await c.aclose()

    async def _take(self, stream: EventStream) -> None:
        async for ev in stream:
            log = self.log
            if isinstance(ev.payload, StateChanged):
                log.arcs[ev.device].append((ev.time, ev.payload.from_state, ev.payload.to_state))
            elif isinstance(ev.payload, PrecopyAnswered):
                log.infos.append((ev.time, ev.device))

    def __enter__(self) -> Follower:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the driver's event stream did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @contextlib.contextmanager
    def point(self) -> Iterator[EventLog]:
        """A new EventLog for what happens inside the block."""
        self.log = log = EventLog()
        yield log
        time.sleep(0.2)  # the last events on their way
        self.log = EventLog()


@dataclass
class Migration:
    """One migration (a process's, or the one process's of all pairs)."""

    pairs: list[tuple[str, str]]
    report: dict[str, Any] | None  # None: it failed
    spawned: float = 0.0  # unix time its process was started
    error: str = ""  # why it failed

    @property
    def downtime(self) -> float | None:
        return None if self.report is None else self.report["downtime_s"]


def _steps(m: Migration, log: EventLog) -> dict[str, float] | None:
    """The switchover's steps (seconds) from the driver's event times: P2P
    arcs of every source, then STOP_COPY, the drain (the report's stop_copy_s
    less the STOP_COPY step), the destinations' RESUMING -> STOP (the load),
    RUNNING_P2P and RUNNING.  "request+reply" is the rest of the downtime:
    the first request's trip to the driver and the last answer's back."""
    r = m.report
    if r is None:
        return None
    srcs, dsts = [s for s, _ in m.pairs], [d for _, d in m.pairs]
    t_p2p = log.latest(srcs, *P2P)
    t_copy = log.latest(srcs, ">STOP_COPY")
    t_loaded = log.latest(dsts, LOADED)
    t_running = log.latest(dsts, RUNNING, last=True)
    if t_p2p is None or t_copy is None or t_loaded is None or t_running is None:
        return None
    hook = r["hook_s"]
    drain = max(0.0, r["stop_copy_s"] - (t_copy - t_p2p))
    driver_seen = t_running - t_p2p - hook
    return {
        "request+reply": max(0.0, r["downtime_s"] - driver_seen),
        "P2P->STOP_COPY": t_copy - t_p2p,
        "drain": min(drain, t_loaded - t_copy),
        "load": max(0.0, t_loaded - t_copy - drain),
        "RUNNING_P2P,RUNNING": t_running - t_loaded - hook,
    }


def _meanwhile(m: Migration, everyone: list[Migration], log: EventLog) -> dict[str, float]:
    """What the other migrations of the point did during m's downtime."""
    src = m.pairs[0][0]
    start, end = log.at(src, *P2P), log.at(m.pairs[-1][1], RUNNING)
    if start is None or end is None or end <= start:
        return {}
    mine = {d for pair in m.pairs for d in pair}
    precopy = stopped = starting = 0
    for o in everyone:
        if o is m:
            continue
        s, d = o.pairs[0]
        first, p2p, run = log.first(d), log.at(s, *P2P), log.at(d, RUNNING)
        if first is None or first > start:
            starting += o.spawned > 0  # a process not at its first state change yet
        elif p2p is None or p2p > start:
            precopy += 1
        elif run is None or run > start:
            stopped += 1
    infos = sum(1 for t, dev in log.infos if start <= t <= end and dev not in mine)
    return {
        "others_in_precopy": precopy,
        "others_stopped": stopped,
        "processes_starting": starting,
        "precopy_info_per_s": infos / (end - start),
    }


# --- the two shapes ---------------------------------------------------------------------


def _pairs(n: int) -> list[tuple[str, str]]:
    return [(pci_name(2 * i + 1), pci_name(2 * i + 2)) for i in range(n)]


def _processes(target: str, firmware: str, n: int, verify: bool) -> tuple[list[Migration], float]:
    check = ["--verify", "yes", "--firmware", firmware] if verify else ["--verify", "no"]
    migrations, procs = [], []
    t0 = time.perf_counter()
    for src, dst in _pairs(n):
        argv = [*VFIOCTL, "--driver", target, "--json", "migrate", src, dst]
        argv += ["--downtime-limit", str(LIMIT_S), *check]
        migrations.append(Migration([(src, dst)], None, time.time()))
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        )
    deadline = t0 + RUN_TIMEOUT_S
    for m, p in zip(migrations, procs, strict=True):
        try:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            m.error = f"killed after {RUN_TIMEOUT_S:g} s"
            continue
        try:
            doc = json.loads(out)
        except ValueError:  # a failure: the report, then the error on one line
            last = (out.strip().splitlines() or [""])[-1]
            doc = json.loads(last) if last.startswith('{"error"') else {}
        if doc.get("status") == "completed":
            m.report = doc
        else:
            m.error = (doc.get("error") or {}).get("message") or f"exit status {p.returncode}"
    return migrations, time.perf_counter() - t0


def _one(target: str, n: int) -> tuple[list[Migration], float]:
    pairs = _pairs(n)
    names = [name for pair in pairs for name in pair]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            [sys.executable, "-c", ONE, target, *names],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return [Migration(pairs, None, error="timeout")], RUN_TIMEOUT_S
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return [Migration(pairs, None, error=why)], wall
    return [Migration(pairs, json.loads(r.stdout))], wall


def _cpu(services: dict[str, psutil.Process]) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds so far of each service, and of this
    process's waited-for children (`clients`: the vfioctl processes)."""
    out: dict[str, tuple[float, float]] = {}
    for name, proc in services.items():
        t = proc.cpu_times()
        out[name] = (t.user, t.system)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["clients"] = (kids.ru_utime, kids.ru_stime)
    return out


def _cpu_per_migration(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], n: int
) -> dict[str, dict[str, float]]:
    """Each party's CPU over the point, in ms per migration: user, system."""
    return {
        name: {
            "user_ms": 1000 * (after[name][0] - before[name][0]) / n,
            "sys_ms": 1000 * (after[name][1] - before[name][1]) / n,
        }
        for name in before
    }


LATE_S = 0.1  # a timer this late counts in a loop's "late" share


def _lag_buckets(urls: dict[str, str]) -> dict[str, list[tuple[float, float]]]:
    """Each service's event-loop lag histogram now: (le, cumulative count)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=10) as r:
            exposition = r.read().decode()
        out[name] = [
            (float(s.labels["le"]), s.value)
            for fam in text_string_to_metric_families(exposition)
            if fam.name == LAG
            for s in fam.samples
            if s.name == f"{LAG}_bucket"
        ]
    return out


def _bound(counts: list[tuple[float, float]], q: float) -> float | None:
    """The first bucket bound holding a share `q` of the observations (None: none)."""
    total = counts[-1][1] if counts else 0.0
    return next((le for le, c in counts if c >= q * total), None) if total else None


def _lag_over_point(
    before: dict[str, list[tuple[float, float]]], after: dict[str, list[tuple[float, float]]]
) -> dict[str, dict[str, float | None]]:
    """Per service, the lag over the point: p50 and p99 as bucket bounds
    (None: no timer ran), and how many timers ran more than LATE_S late."""
    out: dict[str, dict[str, float | None]] = {}
    for name, now in after.items():
        was = dict(before.get(name, []))
        counts = [(le, c - was.get(le, 0.0)) for le, c in sorted(now)]
        total = counts[-1][1] if counts else 0.0
        on_time = next((c for le, c in counts if le >= LATE_S), total)
        out[name] = {
            "samples": total,
            "p50_le_s": _bound(counts, 0.5),
            "p99_le_s": _bound(counts, 0.99),
            "late": total - on_time,
        }
    return out


def _point(
    follower: Follower,
    firmware: str,
    shape: str,
    n: int,
    verify: bool,
    services: dict[str, psutil.Process],
    lag_urls: dict[str, str],
) -> Results:
    target = follower.target
    cpu = _cpu(services)
    lag = _lag_buckets(lag_urls)
    with follower.point() as log:
        if shape == "processes":
            migrations, wall = _processes(target, firmware, n, verify)
        else:
            migrations, wall = _one(target, n)
    cpu_ms = _cpu_per_migration(cpu, _cpu(services), n)
    loop_lag = _lag_over_point(lag, _lag_buckets(lag_urls))
    done = [m for m in migrations if m.report is not None]
    reports = [m.report for m in done if m.report is not None]
    devices = [d for m in migrations for pair in m.pairs for d in pair]
    starts = [t for d in devices if (t := log.first(d)) is not None]
    ends = [t for m in done for _, d in m.pairs if (t := log.at(d, RUNNING, last=True))]
    window = max(ends) - min(starts) if starts and ends else 0.0
    moved = sum(r["precopy_bytes"] + r["stop_copy_bytes"] for r in reports)
    downtimes = [m.downtime for m in done if m.downtime is not None]
    startup = [
        first - m.spawned
        for m in migrations
        if m.spawned and (first := log.first(m.pairs[0][1])) is not None
    ]
    point: Results = {
        "n": n,
        "wall_s": wall,
        "window_s": window,
        "throughput_Bps": moved / window if window else 0.0,
        "downtime_p50_s": statistics.median(downtimes) if downtimes else None,
        "downtime_p99_s": _p99(downtimes),
        "failed": n - sum(len(m.pairs) for m in done),
        "startup_p50_s": statistics.median(startup) if startup else None,
        "startup_max_s": max(startup) if startup else None,
        "cpu_ms_per_migration": cpu_ms,
        "loop_lag": loop_lag,
    }
    if shape == "one" and reports:
        point["converged"] = reports[0]["converged"]
    errors = Counter(m.error for m in migrations if m.report is None)
    if errors:
        point["errors"] = [f"{count} x {why}" for why, count in errors.most_common()]
    slowest = sorted(done, key=lambda m: -(m.downtime or 0))[:SLOWEST]
    point["slowest"] = [
        {
            "device": m.pairs[0][0],
            "downtime_s": m.downtime,
            "steps_s": _steps(m, log),
            "meanwhile": _meanwhile(m, migrations, log),
            "precopy_iterations": (m.report or {}).get("iterations"),
            "stop_copy_bytes": (m.report or {}).get("stop_copy_bytes", 0),
            "precopy_bytes": (m.report or {}).get("precopy_bytes", 0),
        }
        for m in slowest
    ]
    return point


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def _median_of(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_point(rounds: list[Results]) -> Results:
    """The point's medians over the rounds; `slowest` from the round whose
    p99 is the median."""
    out: Results = {"n": rounds[0]["n"], "rounds": len(rounds)}
    for key in (
        "wall_s",
        "window_s",
        "throughput_Bps",
        "throughput_ratio",
        "downtime_p50_s",
        "downtime_p99_s",
        "p99_vs_limit",
        "startup_p50_s",
        "startup_max_s",
    ):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["cpu_ms_per_migration"] = {
        party: {
            kind: statistics.median(r["cpu_ms_per_migration"][party][kind] for r in rounds)
            for kind in ("user_ms", "sys_ms")
        }
        for party in rounds[0]["cpu_ms_per_migration"]
    }
    out["loop_lag"] = {
        party: {
            key: _median_of(r["loop_lag"][party][key] for r in rounds)
            for key in ("samples", "p50_le_s", "p99_le_s", "late")
        }
        for party in rounds[0]["loop_lag"]
    }
    out["failed"] = sum(r["failed"] for r in rounds)
    if any("converged" in r for r in rounds):
        out["converged"] = [r.get("converged") for r in rounds]
    out["errors"] = [e for r in rounds for e in r.get("errors", ())]
    by_p99 = sorted(rounds, key=lambda r: r["downtime_p99_s"] or 0)
    out["slowest"] = by_p99[len(by_p99) // 2]["slowest"]
    out["per_round"] = [
        {k: r[k] for k in ("throughput_ratio", "downtime_p50_s", "downtime_p99_s")} for r in rounds
    ]
    return out


def bench(
    counts: list[int],
    rounds: int,
    shapes: list[str],
    verify: bool,
    dirty: str = DIRTY,
    priority: float = DEFAULT_MAX_WAIT_S,
) -> Results:
    vfs = str(2 * max(counts))
    fw_args = ["--listen", "127.0.0.1:0", "--vfs", vfs, "--size", SIZE, "--dirty-rate", dirty]
    runs: dict[str, dict[int, list[Results]]] = {s: defaultdict(list) for s in shapes}
    with served_with_metrics(FWEMU, *fw_args, "--log-level", "error") as (
        fwemu,
        firmware,
        fw_metrics,
    ):
        # One orchestrator holding N pairs is one client: its data buffers
        # (N x 2 x 16 MiB, and more) would pass the default 1 GiB budget.
        drv_args = ["--listen", "127.0.0.1:0", "--firmware", firmware, "--log-level", "error",
                    "--buffer-budget", "8GiB", "--switchover-priority", str(priority)]  # fmt: skip
        with (
            served_with_metrics(DRIVER, *drv_args) as (driver, target, drv_metrics),
            Follower(target) as follower,
        ):
            services = {"driver": driver, "fwemu": fwemu}
            lag_urls = {"driver": drv_metrics, "fwemu": fw_metrics}
            for _ in range(rounds):
                for n in counts:
                    for shape in shapes:
                        point = _point(follower, firmware, shape, n, verify, services, lag_urls)
                        runs[shape][n].append(point)
    out: Results = {
        "limit_s": LIMIT_S,
        "rounds": rounds,
        "verify": verify,
        "dirty_rate": dirty,
        "switchover_priority_s": priority,
    }
    for shape in shapes:
        base = runs[shape][counts[0]]
        for n in counts:
            for i, point in enumerate(runs[shape][n]):
                point["throughput_ratio"] = point["throughput_Bps"] / (
                    base[i]["throughput_Bps"] or 1.0
                )
                p99 = point["downtime_p99_s"]
                point["p99_vs_limit"] = p99 / LIMIT_S if p99 is not None else None
        out[shape] = [_median_point(runs[shape][n]) for n in counts]
    return out


# --- output -----------------------------------------------------------------------------


def _s(v: float | None, width: int = 6) -> str:
    return f"{v:>{width}.3f}" if v is not None else " " * (width - 1) + "-"


def _le(v: float | None) -> str:
    return f"<={v:g}" if v is not None else "-"


def text(r: Results) -> list[str]:
    lines = [
        f"concurrent migrations of {SIZE} VFs, one driver over fwemu (limit {LIMIT_S} s), "
        f"guests dirtying {r['dirty_rate']}/s, median of {r['rounds']} rounds"
        + (", digests verified" if r["verify"] else "")
        + f", switchover priority {r['switchover_priority_s']:g} s"
    ]
    for shape, what in (("processes", "N vfioctl processes"), ("one", "one process, N pairs")):
        if shape not in r:
            continue
        lines.append(f"{what}:")
        lines.append(
            "    N  window s   MiB/s  x N=1  downtime p50 / p99 s  p99/limit  failed"
            "   wall s  start-up p50/max s"
        )
        for p in r[shape]:
            note = ""
            if p.get("converged") and not all(p["converged"]):
                note = "  (did not converge)"
            lines.append(
                f"  {p['n']:>3}  {_s(p['window_s'], 8)}  {p['throughput_Bps'] / 2**20:>6.0f}  "
                f"{p['throughput_ratio']:>5.2f}   "
                f"{_s(p['downtime_p50_s'])} / {_s(p['downtime_p99_s'])}"
                f"      {p['p99_vs_limit'] or 0:>5.2f}  {p['failed']:>6}  {_s(p['wall_s'], 7)}"
                f"  {_s(p['startup_p50_s'])} / {_s(p['startup_max_s'])}{note}"
            )
            for e in p["errors"]:
                lines.append(f"        failed: {e[:160]}")
        lines.append("  CPU per migration, ms (user + system):")
        for p in r[shape]:
            parts = ", ".join(
                f"{party} {c['user_ms']:.0f} + {c['sys_ms']:.0f}"
                for party, c in p["cpu_ms_per_migration"].items()
            )
            lines.append(f"  {p['n']:>3}  {parts}")
        lines.append(f"  event-loop lag, p50 / p99 (bucket bounds, s), timers > {LATE_S:g} s late:")
        for p in r[shape]:
            parts = ", ".join(
                f"{party} {_le(g['p50_le_s'])} / {_le(g['p99_le_s'])}, {g['late'] or 0:.0f}"
                for party, g in p["loop_lag"].items()
            )
            lines.append(f"  {p['n']:>3}  {parts}")
        for p in r[shape]:
            if p["n"] == 1:
                continue
            lines.append(f"  N={p['n']}, the slowest downtimes (median round), steps in ms:")
            for m in p["slowest"]:
                steps = m["steps_s"] or {}
                what = ", ".join(f"{k} {1000 * v:.0f}" for k, v in steps.items())
                mw = m["meanwhile"]
                lines.append(f"    {_s(m['downtime_s'])} s: {what or 'no events'}")
                lines.append(
                    f"      moved: precopy {m.get('precopy_bytes', 0) / MiB:.1f} MiB in "
                    f"{m.get('precopy_iterations')} iterations, stop-copy "
                    f"{m.get('stop_copy_bytes', 0) / MiB:.1f} MiB"
                )
                if mw:
                    lines.append(
                        f"      meanwhile: {mw['others_in_precopy']} in precopy, "
                        f"{mw['others_stopped']} stopped, {mw['processes_starting']} starting; "
                        f"{mw['precopy_info_per_s']:.0f} PRECOPY_INFO/s by the others"
                    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--counts", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--verify", action="store_true", help="verify each migration's digests")
    p.add_argument(
        "--dirty-rate", default=DIRTY, help=f"every VF's guest workload (default {DIRTY}/s)"
    )
    p.add_argument(
        "--switchover-priority",
        type=priority_wait_arg,
        default=DEFAULT_MAX_WAIT_S,
        metavar="SECONDS",
        help="the driver's --switchover-priority (default its own, "
        f"{DEFAULT_MAX_WAIT_S:g}; 0: off, the driver before it)",
    )
    add_output_flag(p)
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]
    if not set(shapes) <= set(SHAPES) or args.rounds < 1 or counts[0] != 1:
        p.error(f"--shapes from {','.join(SHAPES)}; --rounds >= 1; --counts starting at 1")
    results = bench(
        counts, args.rounds, shapes, args.verify, args.dirty_rate, args.switchover_priority
    )
    return print_results(results, args.json, text)


if __name__ == "__main__":
    sys.exit(main())

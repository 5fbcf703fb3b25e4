"""REINIT load: vfio-loadtest's reinit-loop against one driver process.

The driver (`vfio-driver serve --scenario-service`, its firmware embedded,
1 MiB VFs made by the users) is pinned to the first CPU, and one Locust
process with its users to the second.  For 1, 8 and 64 users it reports
the REINIT loops per second, the RPCs a loop makes, p50/p99 of the REINIT
detection latency (the reconfiguration to the answer carrying REINIT), and
the driver's CPU (cores busy); each reconfiguration replaces vfio-loadtest's
default 64 KiB of objects.  In the same run, the same Locust setup
calls a raw unary RPC (PrecopyInfo of benchmarks/baseline_server.py, a
gRPC server with nothing behind it, on the same CPU) as fast as it answers:
the raw rate.  Goals: at 64 users the driver is the bottleneck (its CPU at
least 0.9 core), and loops/s x RPCs per loop is at least 0.25 x the raw
rate.

    .venv/bin/python benchmarks/reinit_load_bench.py [--seconds 15] [--json]
"""

from __future__ import annotations

import csv
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from procs import BASELINE, DRIVER, ROOT, served
from report import Results, add_output_flag, parser, print_results

USERS = (1, 8, 64)
MEASURES = {"REINIT detection", "re-arm"}  # rows that are not RPCs
DRIVER_CPU, LOAD_CPU = 0, 1
RAW_LOCUSTFILE = ROOT / "benchmarks" / "raw_unary_locustfile.py"


def _pinned(cpu: int) -> Any:
    cpus = sorted(os.sched_getaffinity(0))

    def pin() -> None:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})

    return pin


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _locust(argv: list[str], seconds: float, users: int, csv_prefix: Path) -> float:
    """Run Locust; the CPU time it used (seconds)."""
    cmd = [*argv, "--headless", "-u", str(users), "-r", str(users), "-t", f"{round(seconds)}s",
           "--csv", str(csv_prefix), "--only-summary", "--loglevel", "ERROR"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("VFIO_TLS_")}
    before = _children_cpu()
    subprocess.run(
        cmd,
        check=False,  # failures are counted from the CSV
        timeout=seconds + 120,
        env=env,
        preexec_fn=_pinned(LOAD_CPU),
        stdout=subprocess.DEVNULL,
        stderr=None if os.environ.get("BENCH_DEBUG") else subprocess.DEVNULL,
    )
    return _children_cpu() - before


def _rows(csv_prefix: Path) -> list[dict[str, str]]:
    with Path(f"{csv_prefix}_stats.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["Type"]]


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _reinit_loop(target: str, proc: psutil.Process, users: int, seconds: float) -> Results:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "run"
        argv = [sys.executable, "-m", "vfioload.cli", "--driver", target, "--mix", "reinit-loop"]
        before = _cpu(proc)
        load = _locust(argv, seconds, users, prefix)
        busy = _cpu(proc) - before
        rows = _rows(prefix)
    by_name = {r["Name"]: r for r in rows}
    detect = by_name.get("REINIT detection")
    loops = int(detect["Request Count"]) if detect else 0
    rpcs = sum(int(r["Request Count"]) for r in rows if r["Name"] not in MEASURES)
    return {
        "users": users,
        "loops_per_s": loops / seconds,
        "rpcs_per_loop": rpcs / loops if loops else 0.0,
        "detection_p50_ms": float(detect["50%"]) if detect else None,
        "detection_p99_ms": float(detect["99%"]) if detect else None,
        "driver_cpu_cores": busy / seconds,
        "locust_cpu_cores": load / seconds,
        "failures": sum(int(r["Failure Count"]) for r in rows),
    }


def _raw_rate(seconds: float, users: int) -> Results:
    with served(BASELINE, "--listen", "127.0.0.1:0") as (proc, target):
        os.sched_setaffinity(proc.pid, {sorted(os.sched_getaffinity(0))[DRIVER_CPU]})
        with tempfile.TemporaryDirectory() as tmp:
            prefix = Path(tmp) / "raw"
            argv = [sys.executable, "-m", "locust", "-f", str(RAW_LOCUSTFILE), "--host", target]
            before = _cpu(proc)
            load = _locust(argv, seconds, users, prefix)
            busy = _cpu(proc) - before
            (row,) = [r for r in _rows(prefix) if r["Name"] == "PrecopyInfo"]
    return {
        "users": users,
        "calls_per_s": int(row["Request Count"]) / seconds,
        "server_cpu_cores": busy / seconds,
        "locust_cpu_cores": load / seconds,
    }


def bench(seconds: float) -> Results:
    args = ["--listen", "127.0.0.1:0", "--vfs", "0", "--scenario-service", "--log-level", "error"]
    with served(DRIVER, *args) as (proc, target):
        os.sched_setaffinity(proc.pid, {sorted(os.sched_getaffinity(0))[DRIVER_CPU]})
        loops = [_reinit_loop(target, proc, u, seconds) for u in USERS]
    raw = _raw_rate(seconds, USERS[-1])
    top = loops[-1]
    rpc_rate = top["loops_per_s"] * top["rpcs_per_loop"]
    return {
        "seconds": seconds,
        "reinit_loop": loops,
        "raw_unary": raw,
        "rpc_rate_ratio": rpc_rate / raw["calls_per_s"] if raw["calls_per_s"] else 0.0,
        "driver_bound": top["driver_cpu_cores"] >= 0.9,
    }


def text(r: Results) -> list[str]:
    out = [f"reinit-loop, {r['seconds']:g} s per point (driver on one CPU, Locust on the other)"]
    out.append("users  loops/s  RPCs/loop  detection p50/p99 ms  driver CPU  Locust CPU  failures")
    for p in r["reinit_loop"]:
        out.append(
            f"{p['users']:>5}  {p['loops_per_s']:>7.1f}  {p['rpcs_per_loop']:>9.2f}  "
            f"{p['detection_p50_ms']!s:>9} / {p['detection_p99_ms']!s:<9}  "
            f"{p['driver_cpu_cores']:>9.2f}  {p['locust_cpu_cores']:>10.2f}  {p['failures']:>8}"
        )
    raw = r["raw_unary"]
    out.append(
        f"raw unary (baseline PrecopyInfo, {raw['users']} users): "
        f"{raw['calls_per_s']:.0f} calls/s, server CPU {raw['server_cpu_cores']:.2f}, "
        f"Locust CPU {raw['locust_cpu_cores']:.2f}"
    )
    out.append(
        f"loops/s x RPCs/loop at {r['reinit_loop'][-1]['users']} users = "
        f"{r['rpc_rate_ratio']:.2f} x raw (goal >= 0.25); driver the bottleneck "
        f"(CPU >= 0.9 core): {'yes' if r['driver_bound'] else 'no'}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--seconds", type=int, default=15)
    add_output_flag(p)
    args = p.parse_args(argv)
    return print_results(bench(args.seconds), args.json, text)


if __name__ == "__main__":
    sys.exit(main())

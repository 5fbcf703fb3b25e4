"""What the metrics cost: precopy-info calls per second with metrics on over
metrics off, in the same run.

"On" is each service started with --metrics-listen: the gRPC server
interceptor on every call, the driver's gRPC client interceptor on its
firmware calls, the collectors registered, /metrics served.  Measured with
the firmware embedded in the driver and with fwemu as its own process (each
precopy-info call then makes a firmware call too); off and on alternate,
medians of the rounds.  Goal: on / off >= 0.9.

    .venv/bin/python benchmarks/metrics_bench.py [--seconds 2] [--rounds 3] [--json]
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from driver_bench import PRECOPY_DEVICES, _driver_precopy_rates
from procs import DRIVER, FWEMU, served
from report import Results, add_output_flag, parser, print_results

METRICS = ["--metrics-listen", "127.0.0.1:0"]
IN_FLIGHT = PRECOPY_DEVICES
# One VF per device in flight (_driver_precopy_rates: one caller per device).
VFS = ("--vfs", str(max(PRECOPY_DEVICES)), "--size", "4MiB", "--dirty-rate", "0")


async def _embedded(metrics: bool, seconds: float) -> dict[int, float]:
    extra = METRICS if metrics else []
    with served(DRIVER, *VFS, "--log-level", "warning", *extra) as (_, drv):
        return await _driver_precopy_rates(drv, seconds)


async def _remote(metrics: bool, seconds: float) -> dict[int, float]:
    extra = METRICS if metrics else []
    with (
        served(FWEMU, *VFS, "--log-level", "warning", *extra) as (_, fw),
        served(DRIVER, "--firmware", fw, "--log-level", "warning", *extra) as (_, drv),
    ):  # fmt: skip
        return await _driver_precopy_rates(drv, seconds)


async def bench(seconds: float, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, setup in (("embedded", _embedded), ("remote_firmware", _remote)):
        runs: dict[bool, list[dict[int, float]]] = {False: [], True: []}
        for _ in range(rounds):
            for metrics in (False, True):
                runs[metrics].append(await setup(metrics, seconds))
        for n in IN_FLIGHT:
            off = statistics.median(r[n] for r in runs[False])
            on = statistics.median(r[n] for r in runs[True])
            out[f"{name}_in_flight_{n}"] = {
                "off_calls_per_s": off,
                "on_calls_per_s": on,
                "ratio": on / off,
            }
    out["goal"] = ">= 0.9"
    return out


def text(r: Results) -> Iterator[str]:
    for key, v in r.items():
        if key == "goal":
            continue
        yield (
            f"{key}: off {v['off_calls_per_s']:.0f}/s, on {v['on_calls_per_s']:.0f}/s, "
            f"on/off {v['ratio']:.2f} (goal >= 0.9)"
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    add_output_flag(p)
    args = p.parse_args(argv)
    return print_results(uvloop.run(bench(args.seconds, args.rounds)), args.json, text)


if __name__ == "__main__":
    sys.exit(main())

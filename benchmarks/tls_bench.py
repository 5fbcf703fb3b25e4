"""What mutual TLS costs (issue 12's closing note): the driver's hot paths
with mTLS on every hop, as a ratio to the same without TLS, in the same run.

(a) VFIO_MIG_GET_PRECOPY_INFO calls per second at 1 and 16 in flight
    (driver_bench's measure), with the firmware embedded in the driver and
    with the firmware as its own process (each call then crosses both hops:
    client to driver, driver to firmware).
(b) STOP_COPY read throughput of a VF through the driver with bulk reads
    (ReadStream, 1 MiB chunks; driver_bench's measure), firmware process.

With TLS: both services serve mutual TLS (`--tls-cert/--tls-key
--tls-client-ca`), the driver's firmware link presents its certificate
(`--firmware-tls-*`), and the client its own: a development PKI made for the
run (grpcsvc.certs).  Without: the same processes in plaintext on loopback.
Rounds alternate off and on; each rate is the median of its rounds, each
ratio the median of the rounds' own ratios (a round's two runs share the
machine's load of the moment), printed with their range.  Goal: every ratio
>= 0.8.

    .venv/bin/python benchmarks/tls_bench.py [--size 256MiB] [--seconds 2]
        [--rounds 3] [--only precopy-info|stop-copy] [--json]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop

from fwemu.link.ifc import MiB
from grpcsvc.certs import DevCa
from grpcsvc.tls import ClientTls
from grpcsvc.units import byte_size

sys.path.insert(0, str(Path(__file__).parent))
from driver_bench import _driver_precopy_rates, _driver_stop_copy_read
from procs import DRIVER, FWEMU, served
from report import Results, add_output_flag, parser, print_results, selected

IN_FLIGHT = (1, 16)
QUIET = ("--log-level", "warning")
CLIENT = "bench"  # the benchmark client's principal: spiffe://vfio-mlx5-emu/bench
DRIVER_PRINCIPAL = "vfio-driver"  # CN-only, fwemu's default --driver-principals


class Pki:
    """The run's CA, the services' certificate and the two clients'."""

    def __init__(self, directory: Path) -> None:
        ca = DevCa(directory)
        self.ca = str(ca.cert_path)
        self.server = ca.server("server")
        self.client = ca.client(CLIENT)
        self.driver = ca.client(DRIVER_PRINCIPAL, uri=False)

    def server_args(self) -> list[str]:
        return ["--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key),
                "--tls-client-ca", self.ca]  # fmt: skip

    def firmware_link_args(self) -> list[str]:
        return ["--firmware-tls-ca", self.ca, "--firmware-tls-cert", str(self.driver.cert),
                "--firmware-tls-key", str(self.driver.key)]  # fmt: skip

    def client_tls(self) -> ClientTls:
        return ClientTls(self.ca, str(self.client.cert), str(self.client.key))


@contextlib.contextmanager
def _driver(
    pki: Pki | None, firmware_process: bool, *vf_args: str
) -> Iterator[tuple[str, ClientTls | None]]:
    """A driver (on a firmware process, or with its firmware embedded), with
    mutual TLS on every hop when `pki` is given: (its address, the client's TLS)."""
    server = pki.server_args() if pki else []
    with contextlib.ExitStack() as stack:
        if firmware_process:
            _, fw = stack.enter_context(served(FWEMU, *vf_args, *QUIET, *server))
            link = pki.firmware_link_args() if pki else []
            _, drv = stack.enter_context(served(DRIVER, "--firmware", fw, *QUIET, *server, *link))
        else:
            _, drv = stack.enter_context(served(DRIVER, *vf_args, *QUIET, *server))
        yield drv, pki.client_tls() if pki else None


def _alternating(
    rounds: int, measure: Callable[[Pki | None], Any], pki: Pki
) -> dict[bool, list[Any]]:
    """`measure` without and with TLS, alternating, `rounds` times each."""
    runs: dict[bool, list[Any]] = {False: [], True: []}
    for _ in range(rounds):
        for tls in (False, True):
            runs[tls].append(measure(pki if tls else None))
    return runs


def _ratios(ratios: list[float]) -> Results:
    """The median of the rounds' mTLS/plaintext ratios, and their range."""
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def bench_precopy_info(pki: Pki, seconds: float, rounds: int) -> Results:
    # One VF per device in flight (_driver_precopy_rates: one caller per device).
    vfs = ("--vfs", str(max(IN_FLIGHT)), "--size", "4MiB", "--dirty-rate", "0")
    out: Results = {}
    for name, firmware_process in (("embedded", False), ("firmware_process", True)):

        def measure(p: Pki | None, fp: bool = firmware_process) -> dict[int, float]:
            with _driver(p, fp, *vfs) as (drv, tls):
                return uvloop.run(_driver_precopy_rates(drv, seconds, tls))

        runs = _alternating(rounds, measure, pki)
        for n in IN_FLIGHT:
            out[f"{name}_in_flight_{n}"] = {
                "plaintext_calls_per_s": statistics.median(r[n] for r in runs[False]),
                "mtls_calls_per_s": statistics.median(r[n] for r in runs[True]),
                **_ratios(
                    [on[n] / off[n] for off, on in zip(runs[False], runs[True], strict=True)]
                ),
            }
    out["goal"] = ">= 0.8"
    return out


def bench_stop_copy(pki: Pki, size: int, repeat: int, rounds: int) -> Results:
    vfs = ("--vfs", "1", "--size", str(size), "--dirty-rate", "0")

    def measure(p: Pki | None) -> tuple[float, int]:
        with _driver(p, True, *vfs) as (drv, tls):
            return uvloop.run(_driver_stop_copy_read(drv, repeat, tls))

    runs = _alternating(rounds, measure, pki)
    nbytes = runs[False][0][1]
    assert all(n == nbytes for mode in runs.values() for _, n in mode), "stream sizes differ"
    off = statistics.median(s for s, _ in runs[False])
    on = statistics.median(s for s, _ in runs[True])
    return {
        "vf_bytes": size,
        "stream_bytes": nbytes,
        "plaintext_GBps": nbytes / off / 1e9,
        "mtls_GBps": nbytes / on / 1e9,
        **_ratios([a[0] / b[0] for a, b in zip(runs[False], runs[True], strict=True)]),
        "goal": ">= 0.8",
    }


def text(out: Results) -> Iterator[str]:
    if "precopy_info" in out:
        for key, r in out["precopy_info"].items():
            if key == "goal":
                continue
            yield (
                f"(a) precopy info, {key.replace('_', ' ')}: plaintext "
                f"{r['plaintext_calls_per_s']:.0f}/s, mTLS {r['mtls_calls_per_s']:.0f}/s, "
                f"ratio {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}; goal >= 0.8)"
            )
    if "stop_copy" in out:
        s = out["stop_copy"]
        yield (
            f"(b) STOP_COPY read of a {s['vf_bytes'] / MiB:.0f} MiB VF (firmware process): "
            f"plaintext {s['plaintext_GBps']:.2f} GB/s, mTLS {s['mtls_GBps']:.2f} GB/s, "
            f"ratio {s['ratio']:.2f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}; goal >= 0.8)"
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--size", type=byte_size, default=256 * MiB, help="VF size for (b)")
    p.add_argument("--repeat", type=int, default=3, help="reads per round in (b)")
    p.add_argument("--seconds", type=float, default=2.0, help="duration of each rate in (a)")
    p.add_argument("--rounds", type=int, default=3, help="rounds without and with TLS")
    p.add_argument("--only", choices=["precopy-info", "stop-copy"])
    add_output_flag(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as d:
        pki = Pki(Path(d))
        out = selected(
            args.only,
            {
                "precopy-info": lambda: bench_precopy_info(pki, args.seconds, args.rounds),
                "stop-copy": lambda: bench_stop_copy(pki, args.size, args.repeat, args.rounds),
            },
        )
    return print_results(out, args.json, text)


if __name__ == "__main__":
    sys.exit(main())

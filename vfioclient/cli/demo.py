"""The demo migration: a VF with a live workload migrates to another VF the
way QEMU 11.1 does; during precopy the guest reconfigures the device, the
firmware reports new initial data, the driver answers REINIT, and the
orchestrator re-arms its switchover-ack before it stops the source.

By default everything runs in this process (the firmware model, the driver
service on a loopback port it picks, the orchestrator): nothing to start.
With `--driver HOST:PORT --scenario HOST:PORT` it runs against running
services (`vfio-driver serve --scenario-service`, or a `vfio-driver serve
--firmware` plus its `fwemu serve` as the scenario address), over TLS with
--tls-ca/--tls-cert/--tls-key or VFIO_TLS_CA/CERT/KEY; the embedded services
are plaintext on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fwemu.link.base import LinkError
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import VfConfig
from grpcsvc.runner import run_main
from grpcsvc.tls import TlsError, add_client_args, client_tls_from_args
from grpcsvc.units import byte_size

from ..client import VfioClient, VfioClientError
from ..migration import (
    DeviceMigration,
    DevicePair,
    MigrationError,
    MigrationOptions,
    migrate,
    report_text,
)
from ..transport import FROM_ENV, TlsChoice, resolve_tls
from .args import add_byte_rate, add_data_path
from .migrate import migration_options


@dataclass
class DemoResult:
    report: dict[str, Any]
    source: str
    destination: str
    source_digest: str = ""
    destination_digest: str = ""
    reconfigured: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return bool(self.source_digest) and self.source_digest == self.destination_digest


@contextlib.asynccontextmanager
async def embedded_services(
    size: int, dirty_rate: int, seed: int
) -> AsyncIterator[tuple[str, str]]:
    """A firmware model and a driver service (with the firmware's Scenario
    service) in this process, on a loopback port: (driver, scenario) addresses."""
    from driver.embedded import serve_embedded
    from fwemu.embedded import EmbeddedFirmware

    fw = EmbeddedFirmware.build(size=size, dirty_rate=dirty_rate, seed=seed, scenario=None, vfs=0)
    await fw.link.create_vfs(
        2,
        VfConfig(
            size=size, dirty_bytes_per_s=dirty_rate, save_bandwidth=4 << 30, save_latency_s=0.0005
        ),
    )
    async with serve_embedded(fw) as target:
        yield target, target


async def run_demo(
    driver: str,
    scenario: str,
    options: MigrationOptions,
    *,
    dst_driver: str | None = None,
    dst_scenario: str | None = None,
    tls: TlsChoice = FROM_ENV,
) -> DemoResult:
    """Migrate the first migratable VF to the second one on `driver` (or to
    the first one on `dst_driver`: two hosts); the firmware behind `scenario`
    reconfigures the source at its first switchover-ack; each side's
    firmware (`dst_scenario`, default the `dst_driver` address) gives its
    digest.  `tls` for every connection (as VfioClient's)."""
    link_tls = resolve_tls(tls)
    # Their Scenario services only: no completion stream.
    fw = GrpcLink(scenario, tls=link_tls)
    dst_fw = fw if dst_driver is None else GrpcLink(dst_scenario or dst_driver, tls=link_tls)
    src_c = await VfioClient.connect(driver, tls=link_tls)
    dst_c = await VfioClient.connect(dst_driver or driver, tls=link_tls)
    try:
        devices = [d for d in await src_c.list_devices() if d.migratable]
        if dst_driver is not None:
            devices[1:] = [d for d in await dst_c.list_devices() if d.migratable][:1]
        if len(devices) < 2:
            where = driver if dst_driver is None else f"{driver} and {dst_driver}"
            raise MigrationError(f"the demo needs two migratable devices on {where}")
        src, dst = devices[:2]
        result = DemoResult({}, src.name, dst.name)
        sfd = await src_c.open_device(src.name)
        dfd = await dst_c.open_device(dst.name)

        async def on_ack(d: DeviceMigration) -> None:
            if not result.reconfigured:
                # The guest adds a queue pair after the first ack: new initial data.
                result.reconfigured = True
                await fw.reconfigure(src.vhca_id)

        async def digests(_: DeviceMigration) -> tuple[str, str]:
            # Both VFs are suspended here: their states cannot move.
            result.source_digest = await fw.digest(src.vhca_id)
            result.destination_digest = await dst_fw.digest(dst.vhca_id)
            return result.source_digest, result.destination_digest

        options.on_switchover_ack = on_ack
        options.digests = digests  # the orchestrator fails the migration if they differ
        try:
            report = await migrate([DevicePair(src_c, sfd, dst_c, dfd, name=src.name)], options)
        except MigrationError as e:
            result.report = e.report.to_dict() if e.report is not None else {}
            result.notes.append(f"migration failed: {e}")
            return result
        result.report = report.to_dict()
        return result
    finally:
        await src_c.aclose()
        await dst_c.aclose()
        await fw.close()
        if dst_fw is not fw:
            await dst_fw.close()


def format_report(r: DemoResult) -> str:
    lines = [f"demo: {r.source} -> {r.destination}", report_text(r.report)]
    lines.extend(f"  {n}" for n in r.notes)
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    options = migration_options(args)
    if not args.driver and args.size > options.threshold:
        # mlx5vf reports the whole device state as MIG_DATA_SIZE: a QEMU-like
        # switchover never happens while it exceeds bandwidth x downtime.
        print(
            f"vfioctl demo: error: a {args.size} byte VF never fits the downtime limit "
            f"({options.threshold:.0f} bytes at --bandwidth x --downtime-limit)",
            file=sys.stderr,
        )
        return 2
    if args.driver:
        result = await run_demo(
            args.driver,
            args.scenario or args.driver,
            options,
            dst_driver=args.dst_driver,
            dst_scenario=args.dst_scenario,
            tls=client_tls_from_args(args),
        )
    else:
        async with embedded_services(args.size, args.dirty_rate, args.seed) as (drv, scn):
            result = await run_demo(drv, scn, options, tls=None)
    if args.json:
        print(json.dumps({**result.__dict__, "equal": result.equal}, indent=2))
    else:
        print(format_report(result))
    ok = result.equal and result.report.get("status") == "completed"
    return 0 if ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfioctl demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--driver", metavar="HOST:PORT", help="a running vfio-driver service")
    p.add_argument(
        "--scenario",
        metavar="HOST:PORT",
        help="its firmware's Scenario service (default: the --driver address)",
    )
    p.add_argument(
        "--dst-driver",
        metavar="HOST:PORT",
        help="migrate to the first device of this vfio-driver service (another host)",
    )
    p.add_argument(
        "--dst-scenario",
        metavar="HOST:PORT",
        help="the destination firmware's Scenario service (default: the --dst-driver address)",
    )
    p.add_argument("--size", type=byte_size, default=64 << 20, help="VF state (embedded)")
    add_byte_rate(p, "--dirty-rate", default=16 << 20, help="workload while the VF runs (embedded)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--downtime-limit", type=float, default=0.3, metavar="SECONDS")
    add_byte_rate(
        p,
        "--bandwidth",
        default=256 << 20,
        help="the link bandwidth the switchover decision assumes",
    )
    add_data_path(
        p,
        help="shared memory the drivers map (auto: where they can), or gRPC messages",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_client_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.dst_driver or args.dst_scenario) and not args.driver:
        p.error("--dst-driver and --dst-scenario need --driver (running services)")
    if args.dst_scenario and not args.dst_driver:
        p.error("--dst-scenario needs --dst-driver")
    if (args.tls_ca or args.tls_cert or args.tls_key) and not args.driver:
        p.error("--tls-ca/--tls-cert/--tls-key need --driver (the embedded services are plaintext)")
    return run_main(
        "vfioctl demo", _main(args), {(VfioClientError, LinkError, MigrationError, TlsError): 1}
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`vfioctl demo` in vfioctl's command list; `main` parses its arguments."""
    sub.add_parser(
        "demo",
        help="the demo migration, REINIT included (vfioctl demo --help)",
        add_help=False,
    )

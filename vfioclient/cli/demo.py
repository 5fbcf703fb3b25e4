"""The demo migration: a VF with a live workload migrates to another VF the
way QEMU 11.1 does, and the demo itself causes a REINIT on the way.

When the destination is about to give its first switchover-ack (it has
all the source's initial data), the demo reconfigures the source VF through
the firmware's Scenario service, as a guest adding a queue pair would: the
firmware has new initial data, and the driver's next PRECOPY_INFO answers
REINIT.  The orchestrator then re-arms the switchover-ack: it reads the new
initial data in precopy, announces it again (INIT_DATA_SENT) and waits for a
second ack before it stops the source, so the switchover never leaves
initial data unread.  The firmware digests of both VFs are compared while
both are stopped.  The demo fails (exit 1) if the migration fails, the
digests differ, or the REINIT it caused is not seen.

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
import asyncio
import contextlib
import json
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
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
    at_first_ack,
    format_bytes,
    migrate,
    report_text,
)
from ..transport import FROM_ENV, TlsChoice, resolve_tls
from .args import HELP_FORMATTER, add_byte_rate, add_data_path, seconds
from .migrate import migration_options


@dataclass
class DemoResult:
    report: dict[str, Any]
    source: str
    destination: str
    source_digest: str = ""
    destination_digest: str = ""
    reconfigured: bool = False  # the demo reconfigured the source (to cause a REINIT)
    reconfigured_at_iteration: int = 0  # before this precopy iteration
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return bool(self.source_digest) and self.source_digest == self.destination_digest

    @property
    def caused_reinit(self) -> dict[str, Any] | None:
        """The report's REINIT that followed the demo's reconfiguration, if any."""
        if not self.reconfigured:
            return None
        for e in self.report.get("reinits", []):
            if e["device"] == self.source and e["iteration"] >= self.reconfigured_at_iteration:
                return dict(e)
        return None

    @property
    def ok(self) -> bool:
        completed = self.report.get("status") == "completed"
        return completed and self.equal and self.caused_reinit is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "equal": self.equal,
            "reinit_seen": self.caused_reinit is not None,
            "caused_reinit": self.caused_reinit,
        }


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
    reconfigures the source at its first switchover-ack (between two precopy
    iterations), which the driver answers with REINIT; each side's
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

        async def reconfigure() -> None:
            # The guest adds a queue pair: new initial data for the firmware.
            await fw.reconfigure(src.vhca_id)
            result.reconfigured = True

        async def digests(_: DeviceMigration) -> tuple[str, str]:
            # Both VFs are suspended here: their states cannot move.
            result.source_digest = await fw.digest(src.vhca_id)
            result.destination_digest = await dst_fw.digest(dst.vhca_id)
            return result.source_digest, result.destination_digest

        # At the source's first switchover-ack, between two precopy iterations
        # (hooks.py says why there: otherwise the REINIT can go unseen).
        first = at_first_ack(options, src.name, reconfigure)
        options.digests = digests  # the orchestrator fails the migration if they differ
        try:
            report = await migrate([DevicePair(src_c, sfd, dst_c, dfd, name=src.name)], options)
            result.report = report.to_dict()
        except MigrationError as e:
            result.report = e.report.to_dict() if e.report is not None else {}
            result.notes.append(f"migration failed: {e}")
        result.reconfigured_at_iteration = first.iteration
        if result.report.get("status") == "completed" and result.caused_reinit is None:
            result.notes.append(_no_reinit(result))
        return result
    finally:
        await src_c.aclose()
        await dst_c.aclose()
        await fw.close()
        if dst_fw is not fw:
            await dst_fw.close()


def _no_reinit(r: DemoResult) -> str:
    if not r.reconfigured:
        why = "no switchover-ack came during precopy, so the demo never reconfigured the source"
    else:
        why = (
            f"the demo reconfigured {r.source} before precopy iteration "
            f"{r.reconfigured_at_iteration}, but the driver answered no REINIT after it "
            "(is the MIG_PRECOPY_INFOv2 opt-in refused, or the migration_state cap missing?)"
        )
    return f"error: the REINIT the demo promised was not seen: {why}"


def format_report(r: DemoResult) -> str:
    lines = [f"demo: {r.source} -> {r.destination} (a VF with a live workload)"]
    e = r.caused_reinit
    if e is not None:
        lines.append("  the REINIT, caused by the demo:")
        for step in (
            f"the demo reconfigured {r.source} (added a queue pair through the firmware's "
            "Scenario service, as a guest would) when its destination was about to give "
            "its first switchover-ack;",
            "the driver answered the next PRECOPY_INFO with REINIT: "
            f"{format_bytes(e['initial_bytes'])} of new initial data;",
            "the orchestrator re-armed the switchover-ack, as QEMU 11.1 does: it read the "
            "new initial data in precopy, sent INIT_DATA_SENT again and waited for a second "
            "ack (the destination has all initial data) before stopping the source, so none "
            "was left for the downtime.",
        ):
            lines.append(
                textwrap.fill(step, 78, initial_indent="    - ", subsequent_indent="      ")
            )
    lines.append(report_text(r.report))
    lines.extend(f"  {n}" for n in r.notes)
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    options = migration_options(args)
    if not args.driver and args.size > options.threshold:
        # mlx5vf reports the whole device state as MIG_DATA_SIZE: a QEMU-like
        # switchover never happens while it exceeds bandwidth x downtime.
        print(
            f"vfioctl demo: error: a {format_bytes(args.size)} VF never fits the downtime limit: "
            f"the switchover waits until MIG_DATA_SIZE (the whole state, "
            f"{format_bytes(args.size)}) is at most --bandwidth x --downtime-limit = "
            f"{format_bytes(args.bandwidth)}/s x {args.downtime_limit:g} s = "
            f"{format_bytes(options.threshold)}; give a smaller --size or a larger "
            "--bandwidth or --downtime-limit",
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
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_report(result))
    if not result.ok:
        for note in result.notes:
            print(f"vfioctl demo: {note}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfioctl demo",
        description=__doc__,
        formatter_class=HELP_FORMATTER,
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
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="the embedded firmware's seed, which the VFs' contents and workload derive "
        "from (embedded)",
    )
    p.add_argument(
        "--downtime-limit",
        type=seconds,
        default=0.3,
        metavar="SECONDS",
        help="the longest stop of the source the switchover decision allows",
    )
    add_byte_rate(
        p,
        "--bandwidth",
        default=256 << 20,
        help="the bandwidth the switchover decision assumes; lower than `migrate`'s 1GiB "
        "because the demo's own stack (firmware, driver and orchestrator in Python, one "
        "process) moves a few hundred MiB/s: a higher estimate would let a VF switch over "
        "whose stop-copy then overruns --downtime-limit",
    )
    add_data_path(
        p,
        help="shared memory the drivers map (auto: where they can), or gRPC messages",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="limit for the whole demo, connecting included (default: none)",
    )
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
        "vfioctl demo", _bounded(args), {(VfioClientError, LinkError, MigrationError, TlsError): 1}
    )


async def _bounded(args: argparse.Namespace) -> int:
    """_main within --timeout, if given."""
    if args.timeout is None:
        return await _main(args)
    try:
        return await asyncio.wait_for(_main(args), args.timeout)
    except TimeoutError:
        print(
            f"vfioctl demo: error: timed out after {args.timeout:g} s (--timeout)", file=sys.stderr
        )
        return 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`vfioctl demo` in vfioctl's command list; `main` parses its arguments."""
    sub.add_parser(
        "demo",
        help="the demo migration, REINIT included (vfioctl demo --help)",
        add_help=False,
    )

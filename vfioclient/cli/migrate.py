"""migrate: one device to another with vfioclient.migration, and the report."""

from __future__ import annotations

import argparse
import errno
import os
from typing import Any

from driver.shards import SHARDS_ENV, ShardMap, ShardSpecError, shards_argument, shards_from_env

from ..client import VfioClient, VfioClientError
from ..migration import (
    DevicePair,
    MigrationError,
    MigrationOptions,
    TerminalProgress,
    migrate,
    report_text,
)
from ..scenario import ScenarioClient, ScenarioClientError
from .args import add_byte_rate, add_data_path, positive, seconds
from .command import Command
from .output import CliError, Out


def migration_options(args: argparse.Namespace, **more: Any) -> MigrationOptions:
    """The options migrate and demo both take (--downtime-limit, --bandwidth,
    --data-path), with a progress line, and `more`."""
    return MigrationOptions(
        downtime_limit_s=args.downtime_limit,
        bandwidth_estimate=args.bandwidth,
        progress=TerminalProgress(),  # draws only on a TTY, never under CI
        data_path=args.data_path,
        **more,
    )


async def cmd_migrate(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """migrate a device to another (QEMU-style)

    Migrate SRC to DST with vfioclient.migration (precopy, switchover-ack,
    REINIT handling) and print the report. On failure the source is left
    RUNNING."""
    dst = c
    dst_driver = args.dst_driver or args.driver
    if dst_driver != args.driver:
        dst = await VfioClient.connect(dst_driver, timeout=args.timeout, tls=args.tls)
    scenarios: list[ScenarioClient] = []
    try:
        sfd = await c.open_device(args.src)
        dfd = await dst.open_device(args.dst)
        opts = migration_options(
            args,
            max_precopy_iterations=args.max_iterations,
            fail_on_late_reinit=not args.allow_late_reinit,
        )
        if args.verify != "no":
            shards = _shard_map(args)
            src_fw = args.firmware or _shard_firmware(shards, args.src) or args.driver
            dst_fw = (
                args.dst_firmware or _shard_firmware(shards, args.dst) or args.dst_driver or src_fw
            )
            verifier = await _verifier(
                (c, args.src, src_fw), (dst, args.dst, dst_fw), args, scenarios, out
            )
            if verifier is not None:
                opts.digests = verifier
        pair = DevicePair(c, sfd, dst, dfd, name=args.src)
        try:
            report = await migrate([pair], opts)
        except MigrationError as e:
            if e.report is not None:
                out.doc(e.report.to_dict())
                out.line(report_text(e.report.to_dict()))
            raise CliError(
                errno.EIO,
                f"migration failed: {e}",
                "the source was left RUNNING and the destination reset; see the report above",
            ) from None
    finally:
        for s in scenarios:
            await s.aclose()
        if dst is not c:
            await dst.aclose()
    out.doc(report.to_dict())
    out.line(report_text(report.to_dict()))


def _shard_map(args: argparse.Namespace) -> ShardMap | None:
    """--firmware-shards, else VFIO_FIRMWARE_SHARDS, else None."""
    if args.firmware_shards is not None:
        shards: ShardMap = args.firmware_shards
        return shards
    try:
        return shards_from_env(os.environ)
    except ShardSpecError as e:
        raise CliError(errno.EINVAL, str(e), "fix it, or unset it") from None


def _shard_firmware(shards: ShardMap | None, device: str) -> str | None:
    """The firmware (Scenario service) of `device`'s shard: its PCI domain."""
    if shards is None:
        return None
    try:
        return shards.address_of(device)
    except ShardSpecError as e:
        raise CliError(
            errno.EINVAL, str(e), f"a device's PCI domain is its shard: see {SHARDS_ENV}"
        ) from None


Side = tuple[VfioClient, str, str]  # (driver client, device name, Scenario address)


async def _verifier(
    src: Side, dst: Side, args: argparse.Namespace, keep: list[ScenarioClient], out: Out
) -> Any:
    """A MigrationOptions.digests hook from each side's firmware Scenario
    service; None (with a note) under --verify auto when a side has none."""
    vhcas: list[int] = []
    clients: list[ScenarioClient] = []
    for client, device, target in (src, dst):
        try:
            info = next((d for d in await client.list_devices() if d.name == device), None)
            if info is None:
                raise CliError(errno.ENOENT, f"no device {device}", "see vfioctl list")
            sc = await ScenarioClient.connect(target, timeout=args.timeout, tls=args.tls)
            keep.append(sc)
            await sc.list_vfs()
        except (ScenarioClientError, VfioClientError) as e:
            if args.verify == "yes":
                raise CliError(
                    errno.ENOTSUP,
                    f"cannot verify {device}: no firmware Scenario service at {target} ({e})",
                    "give --firmware / --dst-firmware (or --firmware-shards), or --verify no",
                ) from None
            out.note(f"not verifying: no firmware Scenario service at {target}")
            return None
        vhcas.append(info.vhca_id)
        clients.append(sc)

    async def digests(_: Any) -> tuple[str, str]:
        return await clients[0].digest(vhcas[0]), await clients[1].digest(vhcas[1])

    return digests


def _arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("src", metavar="SRC", help="source device (on --driver)")
    s.add_argument("dst", metavar="DST", help="destination device (on --dst-driver)")
    s.add_argument(
        "--dst-driver", metavar="HOST:PORT", help="the destination's service (default --driver)"
    )
    s.add_argument("--downtime-limit", type=seconds, default=0.3, metavar="S", help="default 0.3 s")
    add_byte_rate(
        s,
        "--bandwidth",
        default=1 << 30,
        metavar="B",
        help="bandwidth estimate in bytes/s (e.g. 1GiB; default 1GiB)",
    )
    s.add_argument("--max-iterations", type=positive, default=10_000, metavar="N")
    s.add_argument(
        "--allow-late-reinit",
        action="store_true",
        help="a REINIT after the switchover decision goes back to precopy instead of failing",
    )
    add_data_path(
        s,
        help="how the data moves: through shared memory the drivers map (same host; no "
        "data over gRPC), or over gRPC (auto: shared memory where a driver can map it)",
    )
    s.add_argument(
        "--verify",
        choices=("auto", "yes", "no"),
        default="auto",
        help="compare the firmware digests of source and destination while both are stopped; "
        "a mismatch fails the migration (auto: when both firmwares have a Scenario service)",
    )
    s.add_argument(
        "--firmware",
        metavar="HOST:PORT",
        help="the source firmware's Scenario service (default: the source's shard, else --driver)",
    )
    s.add_argument(
        "--dst-firmware",
        metavar="HOST:PORT",
        help="the destination firmware's Scenario service (default: the destination's shard, "
        "else --dst-driver, else --firmware)",
    )
    s.add_argument(
        "--firmware-shards",
        type=shards_argument,
        metavar="SPEC",
        help="the firmware shard map (HOST:PORT,... or TEMPLATE@N, as vfio-driver's): a "
        "device's firmware is its PCI domain's shard (default: $" + SHARDS_ENV + ")",
    )


MIGRATE = Command(cmd_migrate, _arguments)

"""migrate: one device to another with vfioclient.migration, and the report;
across hosts, the two agents: `--incoming LISTEN [DST]` (the destination
agent, as `qemu -incoming`) and `SRC DST --to URI` (the source agent)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from driver.shards import SHARDS_ENV, ShardMap, ShardSpecError, shards_argument, shards_from_env
from grpcsvc.tls import TlsError

from ..client import VfioClient, VfioClientError
from ..migration import (
    Address,
    DeviceMigration,
    DevicePair,
    IncomingOptions,
    IncomingReport,
    MigrationError,
    MigrationOptions,
    OutgoingDevice,
    TerminalProgress,
    incoming_text,
    listener_tls,
    migrate,
    migrate_to,
    report_text,
    serve_incoming,
)
from .args import add_byte_rate, add_data_path, positive, seconds
from .command import Command
from .output import CliError, Out

if TYPE_CHECKING:  # imported where verification needs it: `--verify no` skips fwemu.link
    from ..scenario import ScenarioClient


# After "not verifying": where the firmware's Scenario service is, when not at the driver.
FIRMWARE_HINT = (
    "hint: a driver over `fwemu serve` (vfio-driver serve --firmware) has no Scenario "
    "service of its own: give --firmware HOST:PORT, the fwemu's address{dst}; or "
    "--verify no to migrate without verifying"
)
DST_FIRMWARE = " (--dst-firmware HOST:PORT for the destination's, if another)"


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


def _usage(message: str) -> None:
    """A usage error: exit 2, as argparse's."""
    print(f"vfioctl migrate: error: {message}", file=sys.stderr)
    raise SystemExit(2)


async def cmd_migrate(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """migrate a device to another (QEMU-style), here or across hosts

    Migrate SRC to DST with vfioclient.migration (precopy, switchover-ack,
    REINIT handling) and print the report. On failure the source is left
    RUNNING and the destination reset.

    Across hosts, two agents, each beside its driver: `migrate --incoming
    LISTEN [DST]` is the destination agent (as qemu -incoming; LISTEN is
    tcp:HOST:PORT or unix:PATH): with DST it accepts one migration into DST
    and exits 0 (1 if it failed), without DST it serves migrations until
    SIGTERM/SIGINT.  `migrate SRC DST --to URI` is the source agent: it
    migrates SRC on --driver to DST on the destination agent's driver."""
    if args.incoming is not None:
        if args.to is not None or args.dst is not None:
            _usage("--incoming takes at most one device (DST) and no --to")
        await _incoming(c, args, out)
        return
    if args.src is None or args.dst is None:
        _usage("SRC and DST are required (or --incoming LISTEN [DST])")
    if args.to is not None:
        if args.dst_driver or args.dst_firmware:
            _usage("--dst-driver and --dst-firmware are the destination agent's (see --to)")
        await _outgoing(c, args, out)
        return
    dst = c
    dst_driver = args.dst_driver or args.driver
    if args.src == args.dst and dst_driver == args.driver:
        raise CliError(
            errno.EINVAL,
            f"SRC and DST are the same device ({args.src} on {args.driver})",
            "migrate to another device (see `vfioctl list`), or to one of another driver "
            "with --dst-driver",
        )
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


async def _outgoing(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """The source agent: SRC on --driver to DST behind the agent at --to."""
    scenarios: list[ScenarioClient] = []
    try:
        sfd = await c.open_device(args.src)
        opts = migration_options(
            args,
            max_precopy_iterations=args.max_iterations,
            fail_on_late_reinit=not args.allow_late_reinit,
        )
        verify = args.verify
        if args.verify != "no":
            fw = args.firmware or _shard_firmware(_shard_map(args), args.src) or args.driver
            source_digest = await _digest_source(c, fw, args, scenarios, out)
            if source_digest is not None:
                digest = source_digest

                async def digests(d: DeviceMigration) -> tuple[str, str]:
                    return await digest(args.src), d.destination_digest

                opts.digests = digests
            else:
                verify = "no"
        try:
            report = await migrate_to(
                [OutgoingDevice(c, sfd, args.dst, name=args.src)],
                args.to,
                opts,
                tls=args.tls,
                verify=verify,
                idle_timeout_s=args.idle_timeout,
                note=out.note,
            )
        except MigrationError as e:
            if e.report is not None:
                out.doc(e.report.to_dict())
                out.line(report_text(e.report.to_dict()))
            raise CliError(
                e.errno or errno.EIO,
                f"migration failed: {e}",
                "the source was left RUNNING and the destination reset; see the report above",
            ) from None
        except (TlsError, ValueError) as e:
            raise CliError(
                errno.EINVAL, str(e), "see --to and --tls-ca/--tls-cert/--tls-key"
            ) from None
    finally:
        for s in scenarios:
            await s.aclose()
    out.doc(report.to_dict())
    out.line(report_text(report.to_dict()))


async def _incoming(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """The destination agent: migrations into devices of --driver."""
    only: str | None = args.src  # the one positional: DST
    try:
        address = Address.parse(args.incoming)
        tls = listener_tls(args.tls, args.incoming_tls_cert, args.incoming_tls_key)
    except (ValueError, TlsError) as e:
        raise CliError(errno.EINVAL, str(e), "LISTEN is tcp:HOST:PORT or unix:PATH") from None
    scenarios: list[ScenarioClient] = []
    digest = None
    if args.verify != "no":
        shards = _shard_map(args)
        if args.firmware is None and only is None and shards is not None:
            # A standing agent serves any device: each one's digest comes
            # from its PCI domain's shard, asked when its migration loads.
            digest = _shard_digest_source(c, shards, args, scenarios)
        else:
            fw = args.firmware or (_shard_firmware(shards, only) if only else None)
            digest = await _digest_source(c, fw or args.driver, args, scenarios, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def listening(bound: Address) -> None:
        if out.json:
            print(json.dumps({"listening": str(bound)}), flush=True)
        else:
            into = f" into {only}" if only else ""
            print(f"vfioctl migrate: serving incoming migrations{into} on {bound}", flush=True)

    def reported(r: IncomingReport) -> None:
        if out.json:
            print(json.dumps(r.to_dict()), flush=True)
        else:
            out.line(incoming_text(r.to_dict()))

    try:
        reports = await serve_incoming(
            c,
            address,
            only=only,
            once=only is not None,
            options=IncomingOptions(
                stream_depth=16, data_path=args.data_path, idle_timeout_s=args.idle_timeout
            ),
            digest=digest,
            tls=tls,
            insecure=args.insecure,
            on_listening=listening,
            on_report=reported,
            stop=stop,
        )
    except TlsError as e:
        raise CliError(
            errno.EACCES, str(e), "give --incoming-tls-cert/--tls-cert, or --insecure"
        ) from None
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for s in scenarios:
            await s.aclose()
    if only is not None:  # one-shot: its one migration's outcome
        served = [r for r in reports if r.status != "refused"]
        if not served:
            raise CliError(errno.ECANCELED, f"stopped before a migration into {only} came")
        if served[0].status != "completed":
            raise CliError(
                served[0].errno or errno.EIO,
                f"incoming migration failed: {served[0].error}",
                "the destination was reset; see the report above",
            )


async def _digest_source(
    c: VfioClient,
    target: str,
    args: argparse.Namespace,
    keep: list[ScenarioClient],
    out: Out,
) -> Callable[[str], Awaitable[str]] | None:
    """A device's digest from its firmware's Scenario service at `target`;
    None (with a note) under --verify auto when there is none."""
    from ..scenario import ScenarioClient, ScenarioClientError

    try:
        sc = await ScenarioClient.connect(target, timeout=args.timeout, tls=args.tls)
    except ScenarioClientError as e:
        if args.verify == "yes":
            raise CliError(
                errno.ENOTSUP,
                f"cannot verify: no firmware Scenario service at {target} ({e})",
                "give --firmware HOST:PORT (the fwemu's Scenario service) or --firmware-shards, "
                "or --verify no",
            ) from None
        out.note(f"not verifying: {e.strerror or e}")
        out.note(FIRMWARE_HINT.format(dst=""))
        return None
    keep.append(sc)

    async def digest(device: str) -> str:
        info = next((d for d in await c.list_devices() if d.name == device), None)
        if info is None:
            raise CliError(errno.ENOENT, f"no device {device}", "see vfioctl list")
        return await sc.digest(info.vhca_id)

    return digest


def _shard_digest_source(
    c: VfioClient, shards: ShardMap, args: argparse.Namespace, keep: list[ScenarioClient]
) -> Callable[[str], Awaitable[str]]:
    """A device's digest from the Scenario service of its shard (its PCI
    domain's firmware), each shard connected once, when first needed."""
    from ..scenario import ScenarioClient, ScenarioClientError

    clients: dict[str, ScenarioClient] = {}

    async def digest(device: str) -> str:
        target = _shard_firmware(shards, device)
        assert target is not None
        sc = clients.get(target)
        if sc is None:
            try:
                sc = await ScenarioClient.connect(target, timeout=args.timeout, tls=args.tls)
            except ScenarioClientError as e:
                raise CliError(
                    errno.ENOTSUP,
                    f"cannot verify {device}: no firmware Scenario service at {target} ({e})",
                    f"check the shard map ({SHARDS_ENV}), or migrate with --verify no",
                ) from None
            clients[target] = sc
            keep.append(sc)
        info = next((d for d in await c.list_devices() if d.name == device), None)
        if info is None:
            raise CliError(errno.ENOENT, f"no device {device}", "see vfioctl list")
        return await sc.digest(info.vhca_id)

    return digest


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
    from ..scenario import ScenarioClient, ScenarioClientError

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
                    "give --firmware HOST:PORT (the fwemu's Scenario service; --dst-firmware "
                    "for the destination's) or --firmware-shards, or --verify no",
                ) from None
            out.note(f"not verifying: {e.strerror or e}")
            out.note(FIRMWARE_HINT.format(dst=DST_FIRMWARE))
            return None
        vhcas.append(info.vhca_id)
        clients.append(sc)

    async def digests(_: Any) -> tuple[str, str]:
        return await clients[0].digest(vhcas[0]), await clients[1].digest(vhcas[1])

    return digests


def _arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "src",
        metavar="SRC",
        nargs="?",
        help="source device (on --driver); with --incoming: DST, the one device it accepts",
    )
    s.add_argument(
        "dst",
        metavar="DST",
        nargs="?",
        help="destination device (on --dst-driver, or the --to agent's driver)",
    )
    s.add_argument(
        "--dst-driver", metavar="HOST:PORT", help="the destination's service (default --driver)"
    )
    add_agent_args(s)
    s.add_argument(
        "--downtime-limit",
        type=seconds,
        default=0.3,
        metavar="S",
        help="the longest the devices may stay stopped: switch over once what is left to "
        "copy fits in --bandwidth x this many seconds (default 0.3 s)",
    )
    add_byte_rate(
        s,
        "--bandwidth",
        default=1 << 30,
        metavar="B",
        help="bandwidth estimate in bytes/s (e.g. 1GiB; default 1GiB: a host's memory "
        "copy; the demo assumes a slower link)",
    )
    s.add_argument(
        "--max-iterations",
        type=positive,
        default=10_000,
        metavar="N",
        help="precopy iterations at most: then switch over without converging (or fail "
        "if a switchover-ack is still missing)",
    )
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


def add_agent_args(s: argparse.ArgumentParser) -> None:
    """The agents' options (across hosts)."""
    g = s.add_argument_group("across hosts: the two agents")
    g.add_argument(
        "--incoming",
        metavar="LISTEN",
        help="be the destination agent: listen on tcp:HOST:PORT (or HOST:PORT) or unix:PATH "
        "for migrations into devices of --driver (as qemu -incoming)",
    )
    g.add_argument(
        "--to",
        metavar="URI",
        help="be the source agent: migrate to the destination agent at tcp:HOST:PORT or "
        "unix:PATH (DST is a device of its driver)",
    )
    g.add_argument(
        "--incoming-tls-cert",
        metavar="FILE",
        help="the certificate the destination agent presents (default --tls-cert); clients "
        "need certificates signed by --tls-ca when it is given",
    )
    g.add_argument("--incoming-tls-key", metavar="FILE", help="its key (default --tls-key)")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="let the destination agent listen off-host without TLS",
    )
    g.add_argument(
        "--idle-timeout",
        type=seconds,
        default=60.0,
        metavar="S",
        help="end a migration whose peer stays silent this long (default 60 s)",
    )


MIGRATE = Command(cmd_migrate, _arguments)

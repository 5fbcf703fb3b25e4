"""The `vfioctl` command: drive a vfio-driver service from a shell.

Exit codes: 0 success, 1 the operation failed (the errno name and a hint are
printed), 2 usage errors.  `--json` prints one JSON document on stdout (on
failure: {"error": {"errno": ..., "name": ..., "message": ..., "hint": ...}}).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

from driver.api.events import (
    Dropped,
    ErrorAnswered,
    Event,
    Finding,
    PrecopyAnswered,
    SaveCompleted,
    SaveFailed,
    StateChanged,
)
from driver.shards import (
    SHARDS_ENV,
    ShardMap,
    ShardSpecError,
    shards_argument,
    shards_from_env,
)
from driver.vfio.uapi import (
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    VFIO_PRECOPY_INFO_REINIT,
    Feature,
    MigState,
)

from .client import Device, PrecopyInfo, VfioClient, VfioClientError
from .report import report_text
from .scenario import FAULT_KINDS, ScenarioClient, ScenarioClientError
from .usermem import DATA_PATHS

PROG = "vfioctl"
DEFAULT_DRIVER = "127.0.0.1:50052"
CHUNK = 1 << 20

HINTS = {
    errno.ENOTTY: "the device has no migration support (or the feature is not implemented)",
    errno.ENOMSG: "no data available right now (PRE_COPY): read again later",
    errno.ENOENT: "no such device: see `vfioctl list`",
    errno.EINVAL: "the request is not valid in the device's current state (see `vfioctl show`)",
    errno.EBUSY: "the device is busy (another client or an operation in progress)",
    errno.ENODEV: "the data stream is in error: reset the device (`vfioctl reset`)",
    errno.EIO: "the firmware or the service failed the operation",
    errno.EREMOTEIO: "the firmware rejected the command",
    errno.ETIMEDOUT: "the operation timed out (raise --timeout?)",
    errno.EOPNOTSUPP: "the operation is not supported by this device",
}


class CliError(Exception):
    """An expected failure: exit 1 with an errno name and a hint."""

    def __init__(self, code: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.errno = code
        self.hint = hint


def _state(text: str) -> MigState:
    try:
        return MigState[text.strip().upper().replace("-", "_")]
    except KeyError:
        if text.isdigit() and int(text) in MigState._value2member_map_:
            return MigState(int(text))
        names = ", ".join(s.name for s in MigState)
        raise argparse.ArgumentTypeError(f"{text!r} is not a state (one of {names})") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _size(text: str) -> int:
    from grpcsvc.units import byte_size

    return byte_size(text)


def _object(text: str) -> tuple[str, int]:
    kind, sep, size = text.partition(":")
    try:
        return (kind.upper() or "QP"), (_size(size) if sep else 4096)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TYPE[:SIZE], e.g. QP:4096") from None


def flag_names(flags: int) -> list[str]:
    names = [
        n
        for bit, n in [
            (VFIO_MIGRATION_STOP_COPY, "STOP_COPY"),
            (VFIO_MIGRATION_P2P, "P2P"),
            (VFIO_MIGRATION_PRE_COPY, "PRE_COPY"),
        ]
        if flags & bit
    ]
    rest = flags & ~(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY)
    if rest:
        names.append(f"{rest:#x}")
    return names


def _pci_function(name: str) -> int | None:
    """0000:81:dd.f -> function id (dd << 3 | f)."""
    try:
        _, _, devfn = name.rpartition(":")
        dev, _, fn = devfn.partition(".")
        return (int(dev, 16) << 3) | int(fn)
    except ValueError:
        return None


# --- output ---------------------------------------------------------------------------------


class Out:
    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def line(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)

    def doc(self, doc: Any) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, default=str), flush=True)

    def note(self, text: str) -> None:
        """A remark on stderr (stdout stays the result, JSON or text)."""
        print(f"vfioctl: {text}", file=sys.stderr, flush=True)


def _info_dict(i: PrecopyInfo) -> dict[str, Any]:
    return {
        "initial_bytes": i.initial_bytes,
        "dirty_bytes": i.dirty_bytes,
        "flags": i.flags,
        "reinit": i.reinit,
    }


def _info_text(i: PrecopyInfo) -> str:
    reinit = " REINIT" if i.flags & VFIO_PRECOPY_INFO_REINIT else ""
    return f"initial_bytes={i.initial_bytes} dirty_bytes={i.dirty_bytes} flags={i.flags:#x}{reinit}"


# --- commands -------------------------------------------------------------------------------


async def _open(c: VfioClient, name: str) -> int:
    return await c.open_device(name)


async def cmd_list(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    devs = await c.list_devices()
    out.doc({"devices": [{**asdict(d), "migration": flag_names(d.migration_flags)} for d in devs]})
    out.line(f"{'DEVICE':<14} {'VHCA':>5} {'FN':>4} {'OPEN':>4}  {'DRIVER':<10} MIGRATION")
    for d in devs:
        mig = ",".join(flag_names(d.migration_flags)) if d.migratable else "-"
        out.line(
            f"{d.name:<14} {d.vhca_id:>5} {d.function_id:>4} {d.open_count:>4}  "
            f"{d.driver:<10} {mig}"
        )


async def _find(c: VfioClient, name: str) -> Device | None:
    for d in await c.list_devices():
        if d.name == name:
            return d
    return None


async def cmd_show(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    fd = await _open(c, args.device)
    dev = await _find(c, args.device)
    doc: dict[str, Any] = {"device": args.device}
    if dev is not None:
        doc.update(vhca_id=dev.vhca_id, function_id=dev.function_id, driver=dev.driver)
    try:
        flags = await c.migration_flags(fd)
    except VfioClientError as e:
        if e.errno != errno.ENOTTY:
            raise
        doc.update(migration_flags=0, migration=[], migratable=False)
    else:
        doc.update(migration_flags=flags, migration=flag_names(flags), migratable=True)
        doc["state"] = (await c.get_state(fd)).name
        try:
            doc["mig_data_size"] = await c.data_size(fd)
        except VfioClientError as e:
            doc["mig_data_size"] = None
            doc["mig_data_size_error"] = e.name
        doc["dma_logging"] = await c.probe(fd, Feature.DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET)
        doc["precopy_info_v2"] = await c.probe(
            fd, Feature.MIG_PRECOPY_INFOv2, VFIO_DEVICE_FEATURE_SET
        )
    out.doc(doc)
    for k, v in doc.items():
        if k == "migration_flags":
            v = f"{v:#x} ({'|'.join(doc['migration']) or 'none'})"
        elif k == "migration":
            continue
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        out.line(f"{k + ':':<18} {v}")


async def cmd_set_state(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    fd = await _open(c, args.device)
    before = await c.get_state(fd)
    data_fd = await c.set_state(fd, args.state)
    after = await c.get_state(fd)
    out.doc({"device": args.device, "from": before.name, "to": after.name, "data_fd": data_fd})
    out.line(f"{args.device}: {before.name} -> {after.name}")
    if data_fd is not None:
        out.line(
            f"data fd: {data_fd} (it belongs to this vfioctl session and closes when it "
            "exits: use `vfioctl save`/`load` to stream)"
        )


async def _drain(c: VfioClient, data_fd: int, f: Any) -> int:
    """Read what the data fd has now (to EOF, or to ENOMSG in PRE_COPY) into f."""
    n = 0
    try:
        async for chunk in c.read_stream(data_fd, chunk_size=CHUNK):
            f.write(chunk)
            n += len(chunk)
    except VfioClientError as e:
        if e.errno != errno.ENOMSG:
            raise
    return n


async def cmd_save(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    fd = await _open(c, args.device)
    try:
        await _save(c, fd, args, out)
    except BaseException:
        with contextlib.suppress(OSError):  # no partial image left behind
            os.unlink(args.file)
        raise


async def _save(c: VfioClient, fd: int, args: argparse.Namespace, out: Out) -> None:
    iterations: list[dict[str, Any]] = []
    precopy_bytes = 0
    with open(args.file, "wb") as f:
        data_fd: int | None = None
        if args.precopy:
            data_fd = await c.set_state(fd, MigState.PRE_COPY)
            if data_fd is None:
                raise CliError(errno.EIO, "PRE_COPY opened no data fd")
            for i in range(args.iterations):
                info = await c.precopy_info(data_fd)
                n = await _drain(c, data_fd, f)
                precopy_bytes += n
                iterations.append({"iteration": i, **_info_dict(info), "read": n})
                out.line(f"precopy {i}: {_info_text(info)} read={n}")
                if info.initial_bytes == 0 and info.dirty_bytes == 0:
                    break
            new_fd = await c.set_state(fd, MigState.STOP_COPY)
            data_fd = new_fd if new_fd is not None else data_fd
        else:
            await c.set_state(fd, MigState.STOP)
            data_fd = await c.set_state(fd, MigState.STOP_COPY)
            if data_fd is None:
                raise CliError(errno.EIO, "STOP_COPY opened no data fd")
        stop_copy_bytes = await _drain(c, data_fd, f)
    await c.set_state(fd, MigState.STOP)
    total = precopy_bytes + stop_copy_bytes
    out.doc(
        {
            "device": args.device,
            "file": args.file,
            "bytes": total,
            "precopy_bytes": precopy_bytes,
            "stop_copy_bytes": stop_copy_bytes,
            "precopy": iterations,
            "state": MigState.STOP.name,
        }
    )
    out.line(
        f"{args.device}: saved {total} bytes to {args.file} "
        f"(precopy {precopy_bytes}, stop-copy {stop_copy_bytes}); device left STOP"
    )


async def cmd_load(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    f = open(args.file, "rb")  # noqa: SIM115 - closed below; open errors before any RPC
    try:
        fd = await _open(c, args.device)
        data_fd = await c.set_state(fd, MigState.RESUMING)
        if data_fd is None:
            raise CliError(errno.EIO, "RESUMING opened no data fd")

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := f.read(CHUNK):
                yield chunk

        written = await c.write(data_fd, chunks())
    finally:
        f.close()
    await c.set_state(fd, MigState.STOP)
    final = MigState.STOP
    if args.run:
        await c.set_state(fd, MigState.RUNNING)
        final = MigState.RUNNING
    out.doc({"device": args.device, "file": args.file, "bytes": written, "state": final.name})
    out.line(f"{args.device}: loaded {written} bytes from {args.file}; device {final.name}")


async def cmd_precopy_info(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    fd = await _open(c, args.device)
    v2: bool | None = None
    if not args.v1:
        v2 = await c.enable_precopy_info_v2(fd)
        if args.v2 and not v2:
            raise CliError(
                errno.ENOTTY, "MIG_PRECOPY_INFOv2 opt-in refused", "the kernel has no v2 support"
            )
        out.line(f"MIG_PRECOPY_INFOv2: {'enabled' if v2 else 'not supported (v1)'}")
    data_fd = await c.set_state(fd, MigState.PRE_COPY)
    if data_fd is None:
        raise CliError(errno.EIO, "PRE_COPY opened no data fd")
    infos = []
    try:
        for i in range(args.iterations):
            if i:
                await asyncio.sleep(args.interval)
            info = await c.precopy_info(data_fd)
            infos.append({"iteration": i, **_info_dict(info)})
            out.line(f"{i}: {_info_text(info)}")
    finally:
        await c.set_state(fd, MigState.RUNNING)
    out.doc({"device": args.device, "v2": v2, "info": infos, "state": MigState.RUNNING.name})


async def cmd_reset(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    fd = await _open(c, args.device)
    await c.reset(fd)
    try:
        state: str | None = (await c.get_state(fd)).name
    except VfioClientError:
        state = None
    out.doc({"device": args.device, "reset": True, "state": state})
    out.line(f"{args.device}: reset" + (f", state {state}" if state else ""))


async def cmd_migrate(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    from .orchestrator import (
        DevicePair,
        MigrationError,
        MigrationOptions,
        TerminalProgress,
        migrate,
    )

    dst = c
    dst_driver = args.dst_driver or args.driver
    if dst_driver != args.driver:
        dst = await VfioClient.connect(dst_driver, timeout=args.timeout)
    scenarios: list[ScenarioClient] = []
    try:
        sfd = await c.open_device(args.src)
        dfd = await dst.open_device(args.dst)
        opts = MigrationOptions(
            downtime_limit_s=args.downtime_limit,
            bandwidth_estimate=args.bandwidth,
            max_precopy_iterations=args.max_iterations,
            fail_on_late_reinit=not args.allow_late_reinit,
            progress=TerminalProgress(),  # draws only on a TTY, never under CI
            data_path=args.data_path,
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
            sc = await ScenarioClient.connect(target, timeout=args.timeout)
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


# --- events and audit -------------------------------------------------------------------


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _what(ev: Event) -> str:
    p = ev.payload
    if isinstance(p, StateChanged):
        return f"{p.from_state} -> {p.to_state}" + (" (VFIO_DEVICE_RESET)" if p.reset else "")
    if isinstance(p, PrecopyAnswered):
        reinit = " REINIT" if p.reinit else ""
        return (
            f"v{p.version} initial_bytes={p.initial_bytes} dirty_bytes={p.dirty_bytes} "
            f"flags={p.flags:#x}{reinit}"
        )
    if isinstance(p, SaveCompleted):
        return f"image_bytes={p.image_bytes}"
    if isinstance(p, SaveFailed):
        return f"status={p.status:#x}" if p.status >= 0 else f"status={p.status}"
    if isinstance(p, ErrorAnswered):
        return f"{p.operation}: {p.errno_name} ({p.errno}) {p.message}"
    if isinstance(p, Finding):
        return f"{p.rule}: {p.message} [{p.reference}]"
    if isinstance(p, Dropped):
        return f"{p.count} events dropped (this subscriber fell behind)"
    return ""


def _who(client: str, data_fd: int, stream: int) -> str:
    who = [f"client={client}"] if client else []
    if data_fd >= 0:
        who.append(f"fd={data_fd}")
    if stream:
        who.append(f"stream={stream}")
    return " ".join(who)


def event_line(ev: Event) -> str:
    """One line: time, device, kind, what happened, who."""
    who = _who(ev.client, ev.data_fd, ev.stream)
    tail = f"  ({who})" if who else ""
    return f"{_clock(ev.time)} {ev.device or '-':<14} {ev.kind:<14} {_what(ev)}{tail}"


async def cmd_events(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    async with c.events(args.device) as events:
        await events.ready()
        out.note(f"following {args.device or 'every device'} (Ctrl-C to stop)")
        async for ev in events:
            if out.json:
                print(json.dumps(ev.to_dict()), flush=True)
            else:
                print(event_line(ev), flush=True)


async def cmd_audit(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    report = await c.audit(args.device)
    out.doc(
        {
            "device": args.device,
            "findings": [f.to_dict() for f in report.findings],
            "counts": report.counts,
        }
    )
    if not report.findings:
        out.line(f"{args.device or 'all devices'}: no findings")
        return
    for f in report.findings:
        who = _who(f.client, f.data_fd, f.stream)
        out.line(f"{_clock(f.time)} {f.device} {f.rule}  {who}".rstrip())
        out.line(f"  {f.message}")
        out.line(f"  reference: {f.reference}")
    counts = ", ".join(f"{rule}={n}" for rule, n in sorted(report.counts.items()))
    out.line(f"counts: {counts}")


# --- scenario -------------------------------------------------------------------------------


async def _vhca(s: ScenarioClient, vf: str) -> int:
    """A VF named by vhca id (a number) or by its PCI device name."""
    if vf.isdigit():
        return int(vf)
    fn = _pci_function(vf)
    if fn is not None:
        for v in await s.list_vfs():
            if v.function_id == fn:
                return v.vhca_id
    raise CliError(errno.ENOENT, f"no VF {vf!r}", "name a VF by vhca id or PCI name (scenario vfs)")


async def run_scenario(args: argparse.Namespace, out: Out) -> None:
    target = args.firmware or args.driver
    s = await ScenarioClient.connect(target, timeout=args.timeout)
    try:
        if args.scenario_command == "vfs":
            if args.create:
                from fwemu.link.ifc import VfConfig

                cfg = VfConfig(size=args.size) if args.size else None
                await s.create_vfs(args.create, cfg)
            vfs = await s.list_vfs()
            out.doc({"vfs": [asdict(v) for v in vfs]})
            out.line(f"{'VHCA':>5} {'FN':>4} {'SIZE':>10} {'SAVED':>10} {'LOADED':>10} RECONF")
            for v in vfs:
                out.line(
                    f"{v.vhca_id:>5} {v.function_id:>4} {v.config.size:>10} {v.saved_bytes:>10} "
                    f"{v.loaded_bytes:>10} {v.reconfigurations}"
                )
        elif args.scenario_command == "digest":
            digests = {vf: await s.digest(await _vhca(s, vf)) for vf in args.vf}
            out.doc({"digests": digests})
            for vf, d in digests.items():
                out.line(f"{vf} {d}")
        elif args.scenario_command == "reconfigure":
            vhca = await _vhca(s, args.vf)
            tid = await s.reconfigure(
                vhca,
                args.object or None,
                at_time=args.at_time,
                after_saved_bytes=args.after_saved_bytes,
            )
            out.doc({"vhca_id": vhca, "trigger_id": tid})
            out.line(f"vhca {vhca}: reconfiguration armed (trigger {tid})")
        elif args.scenario_command == "fault":
            vhca = await _vhca(s, args.vf)
            try:
                fid = await s.inject_fault(
                    vhca,
                    args.kind,
                    opcode=args.opcode,
                    status=args.status,
                    syndrome=args.syndrome,
                    delay_s=args.delay,
                    count=args.count,
                    in_completion=args.in_completion,
                )
            except ValueError as e:
                raise CliError(
                    errno.EINVAL, str(e), "see `vfioctl scenario fault --help`"
                ) from None
            out.doc({"vhca_id": vhca, "fault_id": fid, "kind": args.kind})
            out.line(f"vhca {vhca}: {args.kind} fault armed (fault {fid})")
    finally:
        await s.aclose()


# --- parser ---------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[VfioClient, argparse.Namespace, Out], Awaitable[None]]] = {
    "list": cmd_list,
    "show": cmd_show,
    "set-state": cmd_set_state,
    "save": cmd_save,
    "load": cmd_load,
    "precopy-info": cmd_precopy_info,
    "reset": cmd_reset,
    "migrate": cmd_migrate,
    "events": cmd_events,
    "audit": cmd_audit,
}


def build_parser() -> argparse.ArgumentParser:
    states = ", ".join(s.name for s in MigState)
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Drive VFIO migration devices of a vfio-driver service "
        "(`vfio-driver serve`). Exit codes: 0 success, 1 the operation failed "
        "(errno name and hint printed), 2 usage errors.",
        epilog="examples: vfioctl list; vfioctl save 0000:81:00.1 vf1.img; "
        "vfioctl load 0000:81:00.2 vf1.img --run; vfioctl migrate 0000:81:00.1 0000:81:00.2",
    )
    p.add_argument(
        "--driver",
        default=DEFAULT_DRIVER,
        metavar="HOST:PORT",
        help=f"the vfio-driver service (default {DEFAULT_DRIVER})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="connect timeout and limit for the whole operation (default 30)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "demo",
        help="the demo migration, REINIT included (vfioctl demo --help)",
        add_help=False,
    )
    sub.add_parser("list", help="list devices", description="List the service's devices.")

    s = sub.add_parser(
        "show",
        help="show a device's migration support and state",
        description="Migration flags (decoded), the FSM state, MIG_DATA_SIZE, and whether "
        "DMA logging and MIG_PRECOPY_INFOv2 are supported (PROBE).",
    )
    s.add_argument("device", metavar="DEVICE", help="PCI name, e.g. 0000:81:00.1")

    s = sub.add_parser(
        "set-state",
        help="set the migration state (shows the arc works)",
        description="SET MIG_DEVICE_STATE and print the data fd if the arc opens one. The fd "
        "belongs to this vfioctl session and closes when it exits (the device fd too): to "
        "stream state use `save` and `load`.",
    )
    s.add_argument("device", metavar="DEVICE")
    s.add_argument("state", metavar="STATE", type=_state, help=f"one of {states}")

    s = sub.add_parser(
        "save",
        help="save a device's state to a file",
        description="RUNNING -> STOP -> STOP_COPY, read the data fd to its end into FILE, "
        "-> STOP (the device is left STOP). With --precopy go through PRE_COPY first, "
        "reading what is available each iteration and printing PRECOPY_INFO.",
    )
    s.add_argument("device", metavar="DEVICE")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--precopy", action="store_true", help="iterate in PRE_COPY first")
    s.add_argument(
        "--iterations",
        type=_positive,
        default=8,
        metavar="N",
        help="at most N precopy iterations (default 8; ends early when nothing is left)",
    )

    s = sub.add_parser(
        "load",
        help="load a device's state from a file",
        description="-> RESUMING, write FILE into the data fd, -> STOP (the driver loads "
        "and validates it); with --run go on to RUNNING.",
    )
    s.add_argument("device", metavar="DEVICE")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--run", action="store_true", help="end RUNNING instead of STOP")

    s = sub.add_parser(
        "precopy-info",
        help="print VFIO_MIG_GET_PRECOPY_INFO in PRE_COPY",
        description="Open PRE_COPY, print the precopy info a few times, return to RUNNING.",
    )
    s.add_argument("device", metavar="DEVICE")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--v1", action="store_true", help="no MIG_PRECOPY_INFOv2 opt-in")
    g.add_argument(
        "--v2", action="store_true", help="require the MIG_PRECOPY_INFOv2 opt-in (REINIT flag)"
    )
    s.add_argument("--iterations", type=_positive, default=3, metavar="N", help="default 3")
    s.add_argument("--interval", type=_seconds, default=0.1, metavar="SECONDS", help="default 0.1")

    s = sub.add_parser("reset", help="reset a device", description="VFIO_DEVICE_RESET.")
    s.add_argument("device", metavar="DEVICE")

    s = sub.add_parser(
        "migrate",
        help="migrate a device to another (QEMU-style)",
        description="Migrate SRC to DST with vfioclient.orchestrator (precopy, switchover-ack, "
        "REINIT handling) and print the report. On failure the source is left RUNNING.",
    )
    s.add_argument("src", metavar="SRC", help="source device (on --driver)")
    s.add_argument("dst", metavar="DST", help="destination device (on --dst-driver)")
    s.add_argument(
        "--dst-driver", metavar="HOST:PORT", help="the destination's service (default --driver)"
    )
    s.add_argument(
        "--downtime-limit", type=_seconds, default=0.3, metavar="S", help="default 0.3 s"
    )
    s.add_argument(
        "--bandwidth",
        type=_size,
        default=1 << 30,
        metavar="B",
        help="bandwidth estimate in bytes/s (e.g. 1GiB; default 1GiB)",
    )
    s.add_argument("--max-iterations", type=_positive, default=10_000, metavar="N")
    s.add_argument(
        "--allow-late-reinit",
        action="store_true",
        help="a REINIT after the switchover decision goes back to precopy instead of failing",
    )
    s.add_argument(
        "--data-path",
        choices=DATA_PATHS,
        default="auto",
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

    s = sub.add_parser(
        "events",
        help="print the driver's events live",
        description="Follow state changes, precopy info answers, SAVE completions and "
        "failures, errno answers and audit findings as they happen, one line each (JSON lines "
        "with --json), until Ctrl-C or the service stops (exit 0 either way).",
    )
    s.add_argument("--device", metavar="DEVICE", help="only this device (default: all)")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON lines")

    s = sub.add_parser(
        "audit",
        help="what clients did that would go wrong, or slow, on a real device",
        description="The orchestrator audit's findings (rule id, client, what happened and "
        "what to do instead, and the kernel or QEMU source the rule comes from). Exit 0 with "
        "or without findings.",
    )
    s.add_argument("device", metavar="DEVICE", nargs="?", help="one device (default: all)")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one document")

    sc = sub.add_parser(
        "scenario",
        help="the firmware's Scenario service (digests, VFs, reconfigurations, faults)",
        description="Talk to a firmware's Scenario service: `fwemu serve`, or "
        "`vfio-driver serve --scenario-service` (the default: the --driver address). "
        "A VF is named by vhca id or by PCI device name.",
    )
    sc.add_argument(
        "--firmware", metavar="HOST:PORT", help="the Scenario service (default: --driver)"
    )
    ssub = sc.add_subparsers(dest="scenario_command", required=True, metavar="ACTION")
    s = ssub.add_parser("vfs", help="list VFs (or create some)", description="List the VFs.")
    s.add_argument("--create", type=_positive, metavar="N", help="create N VFs first")
    s.add_argument("--size", type=_size, metavar="BYTES", help="state size of created VFs")
    s = ssub.add_parser(
        "digest",
        help="VF state digests",
        description="Digest of each VF's state (stable while the VF is suspended).",
    )
    s.add_argument("vf", metavar="VF", nargs="+")
    s = ssub.add_parser(
        "reconfigure",
        help="reconfigure a VF (now, at a time, or after N saved bytes)",
        description="Add objects to a VF: during PRE_COPY this makes the driver REINIT.",
    )
    s.add_argument("vf", metavar="VF")
    s.add_argument(
        "--object",
        type=_object,
        action="append",
        metavar="TYPE[:SIZE]",
        help="an object to add (QP, CQ, MKEY, EQ, SRQ, RQ, SQ, TIR, TIS); repeatable",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--at-time", type=float, metavar="T", help="at firmware time T")
    g.add_argument("--after-saved-bytes", type=_size, metavar="N", help="after N saved bytes")
    s = ssub.add_parser(
        "fault",
        help="inject a firmware fault",
        description="Arm a fault on a VF's next matching command(s).",
    )
    s.add_argument("vf", metavar="VF")
    s.add_argument("kind", metavar="KIND", choices=FAULT_KINDS, help=", ".join(FAULT_KINDS))
    s.add_argument("--opcode", default="SAVE_VHCA_STATE", help="command (name or number)")
    s.add_argument("--status", default="INT_ERR", help="firmware status (name or number)")
    s.add_argument("--syndrome", default="INJECTED", help="syndrome (name or number)")
    s.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="delay faults")
    s.add_argument("--count", type=_positive, default=1, metavar="N", help="commands to hit")
    s.add_argument(
        "--in-completion", action="store_true", help="SAVE FAIL reported in the completion"
    )
    return p


# --- main -----------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, out: Out) -> None:
    if args.command == "scenario":
        await run_scenario(args, out)
        return
    c = await VfioClient.connect(args.driver, timeout=args.timeout)
    try:
        await COMMANDS[args.command](c, args, out)
    finally:
        await c.aclose()


def _hint(code: int, args: argparse.Namespace) -> str | None:
    if code in (errno.ECONNREFUSED, errno.ENOTCONN):
        if args.command == "scenario":
            where = args.firmware or args.driver
            return f"is `fwemu serve` or `vfio-driver serve --scenario-service` running at {where}?"
        return f"is vfio-driver serve running at {args.driver}?"
    return HINTS.get(code)


def _fail(out: Out, code: int, message: str, hint: str | None) -> int:
    name = errno.errorcode.get(code, f"E{code}")
    if out.json:
        print(
            json.dumps({"error": {"errno": code, "name": name, "message": message, "hint": hint}}),
            flush=True,
        )
    print(f"{PROG}: error: {name}: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: hint: {hint}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help: 0, usage errors: 2
        return e.code if isinstance(e.code, int) else 2
    out = Out(args.json)

    async def bounded() -> None:
        if args.command == "events":  # live until interrupted: only connecting is timed
            await _run(args, out)
        else:
            await asyncio.wait_for(_run(args, out), args.timeout)

    try:
        asyncio.run(bounded())
    except (VfioClientError, ScenarioClientError) as e:
        code = e.errno or errno.EIO
        return _fail(out, code, e.strerror or str(e), _hint(code, args))
    except CliError as e:
        return _fail(out, e.errno, str(e), e.hint or _hint(e.errno, args))
    except TimeoutError:
        return _fail(
            out, errno.ETIMEDOUT, f"timed out after {args.timeout:g} s", HINTS[errno.ETIMEDOUT]
        )
    except BrokenPipeError:  # `vfioctl ... | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the FILE of save/load
        code = e.errno or errno.EIO
        return _fail(out, code, f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), None)
    except KeyboardInterrupt:
        return 0 if args.command == "events" else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

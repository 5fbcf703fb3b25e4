"""The device commands: list, show, reset."""

from __future__ import annotations

import argparse
import errno
from dataclasses import asdict
from typing import Any

from ..client import Device, VfioClient, VfioClientError
from ..uapi import (
    VFIO_DEVICE_FEATURE_SET,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    Feature,
)
from .command import Command
from .output import Out, table


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


async def cmd_list(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """list devices

    List the service's devices."""
    devs = await c.list_devices()
    out.doc({"devices": [{**asdict(d), "migration": flag_names(d.migration_flags)} for d in devs]})
    rows = [
        (
            d.name,
            d.vhca_id,
            d.function_id,
            d.open_count,
            d.driver,
            ",".join(flag_names(d.migration_flags)) if d.migratable else "-",
        )
        for d in devs
    ]
    header = ("DEVICE", "VHCA", "FN", "OPEN", "DRIVER", "MIGRATION")
    for line in table(header, rows, right="VHCA FN OPEN"):
        out.line(line)


async def _find(c: VfioClient, name: str) -> Device | None:
    for d in await c.list_devices():
        if d.name == name:
            return d
    return None


async def cmd_show(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """show a device's migration support and state

    Migration flags (decoded), the FSM state, MIG_DATA_SIZE, and whether DMA
    logging and MIG_PRECOPY_INFOv2 are supported (PROBE)."""
    fd = await c.open_device(args.device)
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
        doc["dma_logging"] = await c.dma_logging_supported(fd)
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


async def cmd_reset(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """reset a device

    VFIO_DEVICE_RESET."""
    fd = await c.open_device(args.device)
    await c.reset(fd)
    try:
        state: str | None = (await c.get_state(fd)).name
    except VfioClientError:
        state = None
    out.doc({"device": args.device, "reset": True, "state": state})
    out.line(f"{args.device}: reset" + (f", state {state}" if state else ""))


LIST = Command(cmd_list)
SHOW = Command(cmd_show, device="PCI name, e.g. 0000:81:00.1")
RESET = Command(cmd_reset, device=True)

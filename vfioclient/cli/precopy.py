"""precopy-info: VFIO_MIG_GET_PRECOPY_INFO in PRE_COPY."""

from __future__ import annotations

import argparse
import asyncio
import errno
from typing import Any

from ..client import PrecopyInfo, VfioClient
from ..uapi import VFIO_PRECOPY_INFO_REINIT, MigState
from .args import positive, seconds
from .command import Command
from .output import CliError, Out


def info_dict(i: PrecopyInfo) -> dict[str, Any]:
    return {
        "initial_bytes": i.initial_bytes,
        "dirty_bytes": i.dirty_bytes,
        "flags": i.flags,
        "reinit": i.reinit,
    }


def info_text(i: PrecopyInfo) -> str:
    reinit = " REINIT" if i.flags & VFIO_PRECOPY_INFO_REINIT else ""
    return f"initial_bytes={i.initial_bytes} dirty_bytes={i.dirty_bytes} flags={i.flags:#x}{reinit}"


async def cmd_precopy_info(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """print VFIO_MIG_GET_PRECOPY_INFO in PRE_COPY

    Open PRE_COPY, print the precopy info a few times, return to RUNNING."""
    fd = await c.open_device(args.device)
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
            infos.append({"iteration": i, **info_dict(info)})
            out.line(f"{i}: {info_text(info)}")
    finally:
        await c.set_state(fd, MigState.RUNNING)
    out.doc({"device": args.device, "v2": v2, "info": infos, "state": MigState.RUNNING.name})


def _arguments(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--v1", action="store_true", help="no MIG_PRECOPY_INFOv2 opt-in")
    g.add_argument(
        "--v2", action="store_true", help="require the MIG_PRECOPY_INFOv2 opt-in (REINIT flag)"
    )
    s.add_argument("--iterations", type=positive, default=3, metavar="N", help="queries")
    s.add_argument(
        "--interval", type=seconds, default=0.1, metavar="SECONDS", help="between queries"
    )


PRECOPY_INFO = Command(cmd_precopy_info, _arguments, device=True)

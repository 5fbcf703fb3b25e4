"""set-state: one SET MIG_DEVICE_STATE."""

from __future__ import annotations

import argparse

from ..client import VfioClient
from ..uapi import MigState
from .args import state
from .command import Command
from .output import Out


async def cmd_set_state(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """set the migration state (shows the arc works)

    SET MIG_DEVICE_STATE and print the data fd if the arc opens one. The fd
    belongs to this vfioctl session and closes when it exits (the device fd
    too): to stream state use `save` and `load`."""
    fd = await c.open_device(args.device)
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


def _arguments(s: argparse.ArgumentParser) -> None:
    states = ", ".join(s.name for s in MigState)
    s.add_argument("state", metavar="STATE", type=state, help=f"one of {states}")


SET_STATE = Command(cmd_set_state, _arguments, device=True)

"""The data commands: save a device's state to a file, load it from one."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
from collections.abc import AsyncIterator
from typing import Any

from ..client import VfioClient, VfioClientError
from ..uapi import MigState
from .args import positive
from .command import Command
from .output import CliError, Out
from .precopy import info_dict, info_text

CHUNK = 1 << 20

# What happens to a device vfioctl leaves in STOP: it exits, its session ends
# and closes the device fd, and a device's last close resets the function
# (vfio_pci_core_disable; mlx5vf's next open starts RUNNING).
AFTER_CLOSE = MigState.RUNNING
CLOSED = (
    "device STOP until vfioctl exits: the exit closes it, a device's last close resets "
    "it, and the next open finds it RUNNING (its state kept)"
)


async def _close_data_fd(c: VfioClient, data_fd: int) -> None:
    """Close a data fd once the state change that ended its stream is done,
    before the next one (QEMU's vfio_save_cleanup / vfio_load_cleanup): the
    driver's audit reports one left open (stream-left-open)."""
    await c.close(data_fd)


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
    """save a device's state to a file

    RUNNING -> STOP -> STOP_COPY, read the data fd to its end into FILE, ->
    STOP, close the data fd. With --precopy go through PRE_COPY first,
    reading what is available each iteration and printing PRECOPY_INFO. The
    device stays STOP only while vfioctl holds it: its exit closes the
    device, whose last close resets it to RUNNING (the state unchanged)."""
    fd = await c.open_device(args.device)
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
                iterations.append({"iteration": i, **info_dict(info), "read": n})
                out.line(f"precopy {i}: {info_text(info)} read={n}")
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
    await _close_data_fd(c, data_fd)
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
            "state_after_close": AFTER_CLOSE.name,
        }
    )
    out.line(
        f"{args.device}: saved {total} bytes to {args.file} "
        f"(precopy {precopy_bytes}, stop-copy {stop_copy_bytes}); {CLOSED}"
    )


async def cmd_load(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """load a device's state from a file

    -> RESUMING, write FILE into the data fd, -> STOP (the driver loads and
    validates it), close the data fd; with --run go on to RUNNING. Without
    it the device stays STOP only while vfioctl holds it: its exit closes
    the device, whose last close resets it to RUNNING (the loaded state
    unchanged)."""
    f = open(args.file, "rb")  # noqa: SIM115 - closed below; open errors before any RPC
    try:
        fd = await c.open_device(args.device)
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
    await _close_data_fd(c, data_fd)  # before RUNNING: the stream ended at STOP
    final = MigState.STOP
    if args.run:
        await c.set_state(fd, MigState.RUNNING)
        final = MigState.RUNNING
    out.doc(
        {
            "device": args.device,
            "file": args.file,
            "bytes": written,
            "state": final.name,
            "state_after_close": AFTER_CLOSE.name,
        }
    )
    tail = "device RUNNING" if args.run else CLOSED
    out.line(f"{args.device}: loaded {written} bytes from {args.file}; {tail}")


def _save_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", metavar="FILE", help="the image to write (removed if the save fails)")
    s.add_argument("--precopy", action="store_true", help="iterate in PRE_COPY first")
    s.add_argument(
        "--iterations",
        type=positive,
        default=8,
        metavar="N",
        help="at most N precopy iterations (default 8; ends early when nothing is left)",
    )


def _load_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", metavar="FILE", help="an image `vfioctl save` wrote")
    s.add_argument("--run", action="store_true", help="end RUNNING instead of STOP")


SAVE = Command(cmd_save, _save_arguments, device=True)
LOAD = Command(cmd_load, _load_arguments, device=True)

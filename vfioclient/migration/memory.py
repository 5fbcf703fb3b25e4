"""A device's user memory: one segment of `count` buffers that drivers on
this host map (vfioclient/usermem.py), and which of them could."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..client import VfioClient
from ..usermem import DATA_PATHS, SharedSegment, Slots
from .report import MigrationError

log = logging.getLogger(__name__)


def check_data_path(mode: str) -> None:
    if mode not in DATA_PATHS:
        raise MigrationError(f"unknown data path {mode!r} (auto, shm or grpc)")


async def user_memory(
    name: str, mode: str, size: int, count: int, clients: Sequence[VfioClient]
) -> tuple[Slots | None, list[bool]]:
    """Slots mapped by the first client and, where they can, the others;
    which mapped it.  (None, ...) when the first cannot or `mode` is grpc;
    under `shm` a client that cannot fails the migration."""
    check_data_path(mode)
    none = [False] * len(clients)
    if mode == "grpc":
        return None, none
    try:
        mem = SharedSegment.create(size * count)
    except OSError as e:
        if mode == "shm":
            raise MigrationError(f"{name}: no user memory: {e}") from e
        log.info("%s: no user memory (%s): the data goes over gRPC", name, e)
        return None, none
    try:
        mapped = [await mem.attach(c) is not None for c in clients]
        mem.seal()
    except BaseException:
        await mem.close()
        raise
    if not mapped[0] or (mode == "shm" and not all(mapped)):
        await mem.close()
        if mode == "shm":
            raise MigrationError(f"{name}: a driver cannot map our user memory")
        return None, none
    return Slots(mem, size, count), mapped


def both(source: str, destination: str, *, per_side: bool = False) -> str:
    """The report's data path of a device: one word when both sides move
    their data alike (in one process), else each side's."""
    if source == destination and not per_side:
        return source
    return f"{source} (source), {destination} (destination)"

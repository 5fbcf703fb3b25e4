"""A state change of one side as QEMU's vfio_migration_set_state makes it:
the state, else the named recovery state, else a device reset."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..client import VfioClient, VfioClientError
from ..uapi import MigState
from .report import MigrationError


async def set_state(
    client: VfioClient,
    fd: int,
    state: MigState,
    recovery: MigState | None,
    what: str,
    before_reset: Callable[[], Awaitable[None]],
) -> int | None:
    """`state`, else `recovery`, else DeviceReset (recovery None = QEMU's
    ERROR: reset straight away); MigrationError says which.  `before_reset`
    closes the side's data fd first, so that no stream is cut under its
    holder (QEMU closes it in its cleanup, after the reset; the driver's
    audit asks for it before)."""
    try:
        return await client.set_state(fd, state)
    except VfioClientError as e:
        why = f"{what}: -> {state.name} failed: {e}"
        if recovery is not None:
            try:
                await client.set_state(fd, recovery)
                raise MigrationError(f"{why}; recovered to {recovery.name}", errno=e.errno) from e
            except VfioClientError as e2:
                why += f"; recovery {recovery.name} failed: {e2}"
        await before_reset()
        await client.reset(fd)  # a failing reset propagates: nothing else to try
        raise MigrationError(f"{why}; device reset", errno=e.errno) from e

"""The arc-by-arc loop a variant driver runs for migration_set_state.

mlx5vf_pci_set_device_state (drivers/vfio/pci/mlx5/main.c) and mtty_set_state
(samples/vfio-mdev/mtty.c) both do, under their state mutex:

    while (new != cur) {
        vfio_mig_get_next_state(cur, new, &next)   -> error: stop
        file = step(next)                          -> error: stop
        cur = next
        if (file && cur != new) { fput(file); -EINVAL; stop }   (WARN_ON)
    }

On an error the device stays at the last state it reached.  Here that state is
reported on the raised VfioError as `last_state` (and, arc by arc, through the
optional `reached` callback, the kernel's `mvdev->mig_state = next_state`), so
the driver can record it:

    try:
        self.mig_state, file = await vfio_mig_step_loop(
            self.mig_state, new, self.migration_flags, self.step_device_state)
    except VfioError as err:
        if err.last_state is not None:
            self.mig_state = err.last_state
        raise

A step that needs the arc's source state reads it from the driver, which must
then be kept current arc by arc: pass `reached=` (or update it in the step).
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

from .errors import VfioError
from .fsm import next_state
from .ops import MigrationFile
from .uapi import MigState


async def vfio_mig_step_loop(
    cur: MigState,
    new: int,
    flags: int,
    step: Callable[[MigState], Awaitable[MigrationFile | None]],
    *,
    reached: Callable[[MigState], None] | None = None,
) -> tuple[MigState, MigrationFile | None]:
    """Walk from `cur` to `new` one arc at a time; returns the state reached (=
    `new`) and the data file the last arc produced, if any.

    `new` is the raw device_state the user asked for (it may be out of range).
    A VfioError from next_state or from `step` is re-raised with `last_state`
    set; other exceptions (driver bugs) propagate unchanged.  When cur == new
    nothing is called at all, so ERROR -> ERROR succeeds as in the kernel loops.
    """
    file: MigrationFile | None = None
    while cur != new:
        try:
            nxt = next_state(cur, new, flags)
            file = await step(nxt)
        except VfioError as err:
            err.last_state = cur
            raise
        cur = nxt
        if reached is not None:
            reached(cur)
        if file is not None and cur != new:
            # The core was handed a reference it cannot give to the user: drop it.
            await file.release()
            bug = VfioError(errno.EINVAL, f"arc to {cur.name} made a data file before the target")
            bug.last_state = cur
            raise bug
    return cur, file

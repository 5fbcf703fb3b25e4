"""The arc-by-arc loop a variant driver runs for migration_set_state.

mlx5vf_pci_set_device_state (drivers/vfio/pci/mlx5/main.c) and mtty_set_state
(samples/vfio-mdev/mtty.c) both do, under their state mutex:

    while (new != cur) {
        vfio_mig_get_next_state(cur, new, &next)   -> error: stop
        file = step(next)                          -> error: stop
        cur = next                                 (mvdev->mig_state = next_state)
        if (file && cur != new) { fput(file); -EINVAL; stop }   (WARN_ON)
    }

On an error the device stays at the last state it reached: that state is
reported on the raised VfioError as `last_state`.  What a driver does around
each arc besides the step (its events, audit, statistics, and recording the
state reached) it gives as ArcHooks.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Protocol

from .errors import VfioError
from .fsm import next_state
from .ops import MigrationFile
from .uapi import MigState


class ArcHooks(Protocol):
    """What a driver does around each arc of the loop."""

    def arc_starting(self, cur: MigState, nxt: MigState) -> None:
        """Before the step of the arc cur -> nxt."""
        ...

    def arc_ended(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        """After the step, whether it failed or not; `file`: what a step that
        succeeded returned (None after a failure)."""
        ...

    def arc_done(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        """The step succeeded: the device is in `nxt` now."""
        ...


async def vfio_mig_step_loop(
    cur: MigState,
    new: int,
    flags: int,
    step: Callable[[MigState], Awaitable[MigrationFile | None]],
    hooks: ArcHooks | None = None,
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
        except VfioError as err:
            err.last_state = cur
            raise
        if hooks is not None:
            hooks.arc_starting(cur, nxt)
        file = None
        try:
            file = await step(nxt)
        except VfioError as err:
            err.last_state = cur
            raise
        finally:
            if hooks is not None:
                hooks.arc_ended(cur, nxt, file)
        if hooks is not None:
            hooks.arc_done(cur, nxt, file)
        cur = nxt
        if file is not None and cur != new:
            # The core was handed a reference it cannot give to the user: drop it.
            await file.release()
            bug = VfioError(errno.EINVAL, f"arc to {cur.name} made a data file before the target")
            bug.last_state = cur
            raise bug
    return cur, file

"""Something done to a device at a chosen moment of its migration, through
MigrationOptions' hooks (the demo, tests): `at_first_ack`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .options import Hook, MigrationOptions

if TYPE_CHECKING:
    from .device import DeviceMigration


@dataclass
class FirstAck:
    """What `at_first_ack` arranged: `done` once the action ran (its error,
    if it raised one, failed the migration)."""

    device: str
    action: Hook
    done: bool = False
    iteration: int = 0  # the precopy iteration it ran before
    _held: list[asyncio.Event] = field(default_factory=list)  # the first ack, held


def at_first_ack(options: MigrationOptions, device: str, action: Hook) -> FirstAck:
    """Run `action` once, when `device`'s destination is about to give its
    first switchover-ack (before that ack counts).

    The ack is held until the next precopy iteration begins and the action
    runs there, while none of the orchestrator's calls is in flight.  An
    action that reconfigures the device (new initial data) at any other
    moment can land inside a PRECOPY_INFO, between the driver's
    QUERY_VHCA_MIGRATION_STATE and the SAVE it then issues: that SAVE takes
    the new data as dirty data, which migrates correctly but is never
    reported as REINIT (as on real mlx5: two firmware commands).  Done at the
    boundary, the next PRECOPY_INFO answers REINIT.  The options' own
    on_switchover_ack and on_iteration hooks still run, first."""
    first = FirstAck(device, action)
    previous_ack, previous_iteration = options.on_switchover_ack, options.on_iteration

    async def on_switchover_ack(d: DeviceMigration) -> None:
        if previous_ack is not None:
            await previous_ack(d)
        if d.name == device and not first.done and not first._held:
            held = asyncio.Event()
            first._held.append(held)
            await held.wait()

    async def on_iteration(iteration: int) -> None:
        if previous_iteration is not None:
            await previous_iteration(iteration)
        if first._held and not first.done:
            first.iteration = iteration
            try:
                await action()
            finally:
                first.done = True
                first._held[0].set()

    options.on_switchover_ack = on_switchover_ack
    options.on_iteration = on_iteration
    return first

"""vfio_mig_get_next_state(): the migration FSM of drivers/vfio/vfio_main.c.

The table is data, row = current state, column = requested target, cell = the
next single step, laid out like the kernel's vfio_from_fsm_table so that the two
can be held side by side.
"""

from __future__ import annotations

import errno

from .errors import VfioError
from .uapi import (
    VFIO_DEVICE_STATE_NR,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    MigState,
)

S = MigState
ANY = ~0

# Flags a state needs from the device's migration_flags (vfio_from_fsm_table's
# state_flags_table in the kernel).
STATE_FLAGS: dict[MigState, int] = {
    S.STOP: VFIO_MIGRATION_STOP_COPY,
    S.RUNNING: VFIO_MIGRATION_STOP_COPY,
    S.STOP_COPY: VFIO_MIGRATION_STOP_COPY,
    S.RESUMING: VFIO_MIGRATION_STOP_COPY,
    S.RUNNING_P2P: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
    S.ERROR: ANY,
    S.PRE_COPY: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
    S.PRE_COPY_P2P: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
}

# vfio_from_fsm_table[cur][new]
_COLUMNS = (S.STOP, S.RUNNING, S.STOP_COPY, S.RESUMING, S.RUNNING_P2P, S.PRE_COPY,
            S.PRE_COPY_P2P, S.ERROR)  # fmt: skip
_TABLE_ROWS: dict[MigState, tuple[MigState, ...]] = {
    #               STOP            RUNNING         STOP_COPY       RESUMING        RUNNING_P2P     PRE_COPY        PRE_COPY_P2P    ERROR  # noqa: E501
    S.STOP:         (S.STOP,        S.RUNNING_P2P,  S.STOP_COPY,    S.RESUMING,     S.RUNNING_P2P,  S.RUNNING_P2P,  S.RUNNING_P2P,  S.ERROR),  # noqa: E501
    S.RUNNING:      (S.RUNNING_P2P, S.RUNNING,      S.RUNNING_P2P,  S.RUNNING_P2P,  S.RUNNING_P2P,  S.PRE_COPY,     S.RUNNING_P2P,  S.ERROR),  # noqa: E501
    S.STOP_COPY:    (S.STOP,        S.STOP,         S.STOP_COPY,    S.STOP,         S.STOP,         S.ERROR,        S.ERROR,        S.ERROR),  # noqa: E501
    S.RESUMING:     (S.STOP,        S.STOP,         S.STOP,         S.RESUMING,     S.STOP,         S.STOP,         S.STOP,         S.ERROR),  # noqa: E501
    S.RUNNING_P2P:  (S.STOP,        S.RUNNING,      S.STOP,         S.STOP,         S.RUNNING_P2P,  S.RUNNING,      S.PRE_COPY_P2P, S.ERROR),  # noqa: E501
    S.PRE_COPY:     (S.RUNNING,     S.RUNNING,      S.PRE_COPY_P2P, S.RUNNING,      S.RUNNING,      S.PRE_COPY,     S.PRE_COPY_P2P, S.ERROR),  # noqa: E501
    S.PRE_COPY_P2P: (S.RUNNING_P2P, S.RUNNING_P2P,  S.STOP_COPY,    S.RUNNING_P2P,  S.RUNNING_P2P,  S.PRE_COPY,     S.PRE_COPY_P2P, S.ERROR),  # noqa: E501
    S.ERROR:        (S.ERROR,       S.ERROR,        S.ERROR,        S.ERROR,        S.ERROR,        S.ERROR,        S.ERROR,        S.ERROR),  # noqa: E501
}  # fmt: skip

FSM_TABLE: dict[MigState, dict[MigState, MigState]] = {
    cur: dict(zip(_COLUMNS, row, strict=True)) for cur, row in _TABLE_ROWS.items()
}


def state_supported(state: int, migration_flags: int) -> bool:
    if not 0 <= state < VFIO_DEVICE_STATE_NR:
        return False
    need = STATE_FLAGS[MigState(state)]
    return need != ANY and (need & migration_flags) == need


def next_state(cur: int, new: int, migration_flags: int) -> MigState:
    """The next single step from `cur` towards `new` (vfio_mig_get_next_state).

    Raises VfioError(EINVAL) where the kernel returns -EINVAL.  A `cur` the
    device cannot be in is a driver bug the kernel WARNs about.
    """
    if cur >= VFIO_DEVICE_STATE_NR or cur < 0:
        raise VfioError(errno.EINVAL, f"current state {cur} out of range (kernel WARN)")
    cur_s = MigState(cur)
    need = STATE_FLAGS[cur_s]
    if need != ANY and (need & migration_flags) != need:
        raise VfioError(errno.EINVAL, f"current state {cur_s.name} unsupported (kernel WARN)")
    if not state_supported(new, migration_flags):
        raise VfioError(errno.EINVAL, f"state {new} is not a valid target for this device")
    new_s = MigState(new)
    nxt = FSM_TABLE[cur_s][new_s]
    # Stop at ERROR: without that test the loop never ends for STOP_COPY ->
    # PRE_COPY(_P2P), as the 2026 stable fix "vfio: fix infinite loop in
    # vfio_mig_get_next_state" added to the kernel's loop.
    while nxt != S.ERROR and not state_supported(nxt, migration_flags):
        nxt = FSM_TABLE[nxt][new_s]
    if nxt == S.ERROR:
        raise VfioError(errno.EINVAL, f"no path from {cur_s.name} to {new_s.name}")
    return nxt

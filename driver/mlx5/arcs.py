"""mlx5vf_pci_step_device_state_locked() (drivers/vfio/pci/mlx5/main.c) as
data: for each arc the FSM hands the driver, what the driver does, in order.

The rows follow the kernel's if-chain from top to bottom, so that the two can
be held side by side; an arc that is not here is the kernel's final
WARN_ON(true), -EINVAL.  Mlx5VfDevice.step_device_state_locked runs a row.
"""

from __future__ import annotations

import enum

from ..vfio.uapi import MigState

S = MigState


class ArcStep(enum.Enum):
    """One thing an arc does (the kernel's call for it)."""

    # mlx5vf_cmd_suspend_vhca(MLX5_SUSPEND_VHCA_IN_OP_MOD_SUSPEND_RESPONDER)
    SUSPEND_RESPONDER = enum.auto()
    # mlx5vf_cmd_resume_vhca(MLX5_RESUME_VHCA_IN_OP_MOD_RESUME_RESPONDER)
    RESUME_RESPONDER = enum.auto()
    # mlx5vf_cmd_suspend_vhca(MLX5_SUSPEND_VHCA_IN_OP_MOD_SUSPEND_INITIATOR)
    SUSPEND_INITIATOR = enum.auto()
    # mlx5vf_cmd_resume_vhca(MLX5_RESUME_VHCA_IN_OP_MOD_RESUME_INITIATOR)
    RESUME_INITIATOR = enum.auto()
    # mlx5vf_pci_save_device_data(mvdev, false): a new saving file
    SAVE_DEVICE_DATA = enum.auto()
    # mlx5vf_pci_save_device_data(mvdev, true): a new saving file, tracking
    SAVE_DEVICE_DATA_TRACK = enum.auto()
    # mlx5vf_pci_save_device_inc_data()
    SAVE_DEVICE_INC_DATA = enum.auto()
    # query(INC|CLEANUP), SAVE, mlx5vf_disable_fds(): EIO if the file is in ERROR
    PRE_COPY_CLEANUP = enum.auto()
    # mlx5vf_pci_resume_device_data(): a new resuming file
    RESUME_DEVICE_DATA = enum.auto()
    # mlx5vf_disable_fds()
    DISABLE_FDS = enum.auto()


A = ArcStep

# (cur, new) -> steps; the file a step returns is the arc's.
MLX5VF_ARCS: dict[tuple[MigState, MigState], tuple[ArcStep, ...]] = {
    (S.RUNNING_P2P, S.STOP): (A.SUSPEND_RESPONDER,),
    (S.STOP, S.RUNNING_P2P): (A.RESUME_RESPONDER,),
    (S.RUNNING, S.RUNNING_P2P): (A.SUSPEND_INITIATOR,),
    (S.PRE_COPY, S.PRE_COPY_P2P): (A.SUSPEND_INITIATOR,),
    (S.RUNNING_P2P, S.RUNNING): (A.RESUME_INITIATOR,),
    (S.PRE_COPY_P2P, S.PRE_COPY): (A.RESUME_INITIATOR,),
    (S.STOP, S.STOP_COPY): (A.SAVE_DEVICE_DATA,),
    (S.STOP_COPY, S.STOP): (A.DISABLE_FDS,),
    (S.PRE_COPY, S.RUNNING): (A.PRE_COPY_CLEANUP,),
    (S.PRE_COPY_P2P, S.RUNNING_P2P): (A.PRE_COPY_CLEANUP,),
    (S.STOP, S.RESUMING): (A.RESUME_DEVICE_DATA,),
    (S.RESUMING, S.STOP): (A.DISABLE_FDS,),
    (S.RUNNING, S.PRE_COPY): (A.SAVE_DEVICE_DATA_TRACK,),
    (S.RUNNING_P2P, S.PRE_COPY_P2P): (A.SAVE_DEVICE_DATA_TRACK,),
    (S.PRE_COPY_P2P, S.STOP_COPY): (A.SUSPEND_RESPONDER, A.SAVE_DEVICE_INC_DATA),
}

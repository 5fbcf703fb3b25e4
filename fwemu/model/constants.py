"""Numbers of the mlx5 firmware interface, named as in include/linux/mlx5/mlx5_ifc.h
and include/linux/mlx5/device.h, plus the emulator's own syndromes."""

from __future__ import annotations

import enum
import errno


class Opcode(enum.IntEnum):
    """MLX5_CMD_OP_*."""

    QUERY_HCA_CAP = 0x100
    CREATE_MKEY = 0x200
    DESTROY_MKEY = 0x202
    SUSPEND_VHCA = 0x115
    RESUME_VHCA = 0x116
    QUERY_VHCA_MIGRATION_STATE = 0x117
    SAVE_VHCA_STATE = 0x118
    LOAD_VHCA_STATE = 0x119
    CREATE_GENERAL_OBJECT = 0xA00
    MODIFY_GENERAL_OBJECT = 0xA01
    DESTROY_GENERAL_OBJECT = 0xA03


class CmdStatus(enum.IntEnum):
    """MLX5_CMD_STAT_*: the outbox status byte."""

    OK = 0x0
    INT_ERR = 0x1
    BAD_OP_ERR = 0x2
    BAD_PARAM_ERR = 0x3
    BAD_SYS_STATE_ERR = 0x4
    BAD_RES_ERR = 0x5
    RES_BUSY = 0x6
    NOT_READY = 0x7
    LIM_ERR = 0x8
    BAD_RES_STATE_ERR = 0x9
    IX_ERR = 0xA
    NO_RES_ERR = 0xF
    BAD_QP_STATE_ERR = 0x10
    BAD_PKT_ERR = 0x30
    BAD_SIZE_OUTS_CQES_ERR = 0x40
    BAD_INP_LEN_ERR = 0x50
    BAD_OUTP_LEN_ERR = 0x51


# mlx5_cmd_check(): the errno a synchronous command returns for a status.
_STATUS_ERRNO = {
    CmdStatus.OK: 0,
    CmdStatus.INT_ERR: errno.EIO,
    CmdStatus.BAD_OP_ERR: errno.EINVAL,
    CmdStatus.BAD_PARAM_ERR: errno.EINVAL,
    CmdStatus.BAD_SYS_STATE_ERR: errno.EIO,
    CmdStatus.BAD_RES_ERR: errno.EINVAL,
    CmdStatus.RES_BUSY: errno.EBUSY,
    CmdStatus.NOT_READY: errno.EAGAIN,
    CmdStatus.LIM_ERR: errno.ENOMEM,
    CmdStatus.BAD_RES_STATE_ERR: errno.EINVAL,
    CmdStatus.IX_ERR: errno.EINVAL,
    CmdStatus.NO_RES_ERR: errno.EAGAIN,
    CmdStatus.BAD_QP_STATE_ERR: errno.EINVAL,
    CmdStatus.BAD_PKT_ERR: errno.EINVAL,
    CmdStatus.BAD_SIZE_OUTS_CQES_ERR: errno.EINVAL,
    CmdStatus.BAD_INP_LEN_ERR: errno.EIO,
    CmdStatus.BAD_OUTP_LEN_ERR: errno.EIO,
}


def status_to_errno(status: int) -> int:
    """What mlx5_cmd_check() turns a firmware status into (unknown -> EIO)."""
    try:
        return _STATUS_ERRNO[CmdStatus(status)]
    except ValueError:
        return errno.EIO


class SuspendOpMod(enum.IntEnum):
    """MLX5_SUSPEND_VHCA_IN_OP_MOD_*."""

    SUSPEND_INITIATOR = 0
    SUSPEND_RESPONDER = 1


class ResumeOpMod(enum.IntEnum):
    """MLX5_RESUME_VHCA_IN_OP_MOD_* (note the numbering is swapped w.r.t. SUSPEND)."""

    RESUME_RESPONDER = 0
    RESUME_INITIATOR = 1


class MigState(enum.IntEnum):
    """MLX5_QUERY_VHCA_MIG_STATE_* (query_vhca_migration_state_out.migration_state).

    The kernel names these and only tests for OPER_MIGRATION_INIT; the meaning of
    the others is this emulator's choice (README, "migration_state"):

    * UNINITIALIZED: no tracking session and the VF is not fully suspended.
    * OPER_MIGRATION_IDLE: tracking, nothing changed since the last tracked SAVE.
    * OPER_MIGRATION_READY: no tracking session and the VF is fully suspended:
      its state is frozen and a final SAVE captures all of it.
    * OPER_MIGRATION_DIRTY: tracking, state dirtied since the last tracked SAVE.
    * OPER_MIGRATION_INIT: tracking, and a reconfiguration added initial data
      that no tracked SAVE has captured yet (takes precedence over DIRTY).
    """

    UNINITIALIZED = 0x0
    OPER_MIGRATION_IDLE = 0x1
    OPER_MIGRATION_READY = 0x2
    OPER_MIGRATION_DIRTY = 0x3
    OPER_MIGRATION_INIT = 0x4


class CapType(enum.IntEnum):
    """MLX5_SET_HCA_CAP_OP_MOD_*: QUERY_HCA_CAP op_mod = (type << 1) | cur."""

    GENERAL_DEVICE = 0x0
    GENERAL_DEVICE_2 = 0x20


HCA_CAP_OPMOD_GET_MAX = 0
HCA_CAP_OPMOD_GET_CUR = 1


class Syndrome(enum.IntEnum):
    """The emulator's syndromes.  Real syndromes are opaque 32-bit values from
    the PRM; these name the rule a command broke so that tests and users can
    tell failures apart.  The high half spells 'FW'."""

    NONE = 0
    UNKNOWN_VHCA = 0x46570001
    BAD_OP_MOD = 0x46570002
    BAD_SIZE = 0x46570003
    UNKNOWN_MKEY = 0x46570004
    MKEY_RANGE = 0x46570005
    FIELD_RANGE = 0x46570006
    SAVE_IN_FLIGHT = 0x46570010
    NO_TRACKING = 0x46570011
    TRACKING_LOST = 0x46570012
    NOT_SUSPENDED = 0x46570013
    BUFFER_TOO_SMALL = 0x46570014
    IMAGE_TOO_LARGE = 0x46570015
    NOT_MIGRATABLE = 0x46570016
    CHUNKS_UNSUPPORTED = 0x46570017
    NOT_RUNNING = 0x46570018
    ALREADY_SUSPENDED = 0x46570019
    INITIATOR_RUNNING = 0x4657001A
    RESPONDER_SUSPENDED = 0x4657001B
    MIGRATION_BUSY = 0x4657001C
    IMAGE_BAD_MAGIC = 0x46570020
    IMAGE_TRUNCATED = 0x46570021
    IMAGE_CHECKSUM = 0x46570022
    IMAGE_FOREIGN = 0x46570023
    IMAGE_OUT_OF_ORDER = 0x46570024
    IMAGE_MALFORMED = 0x46570025
    NO_MEMORY = 0x46570026
    CAP_MISSING = 0x46570027
    ABORTED = 0x46570028
    IMAGE_TRAILING = 0x46570029
    TOO_MANY_MKEYS = 0x4657002A
    INJECTED = 0x465700FF


MiB = 1 << 20
KiB = 1 << 10
GiB = 1 << 30

PAGE_SIZE = 4096
MAX_U32 = (1 << 32) - 1
MAX_U16 = (1 << 16) - 1


def enum_name(cls: type[enum.IntEnum], value: int) -> str:
    """The member's name, or the number when the enum has no such member."""
    try:
        return cls(value).name
    except ValueError:
        return str(value)

"""The firmware interface: the counterpart of include/linux/mlx5/mlx5_ifc.h.

Everything a driver, a link adapter or a scenario client needs to know about the
emulated firmware, and nothing of how the model keeps its state: opcodes,
statuses, syndromes, op_mods, capability limits, the command results (the
outbox fields), the asynchronous SAVE completion, and the scenario's value types
(VF configuration, faults, VF snapshots).  The device model (fwemu.model)
implements this interface; the driver (driver/) and both link adapters
(fwemu.link.grpc, fwemu.link.inproc) only ever import it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast, get_args

MiB = 1 << 20
KiB = 1 << 10
GiB = 1 << 30

# MLX5_ADAPTER_PAGE_SIZE: the unit of page-granular sizes and of dirty tracking.
PAGE_SIZE = 4096
MAX_U32 = (1 << 32) - 1
MAX_U16 = (1 << 16) - 1


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


class SuspendOpMod(enum.IntEnum):
    """MLX5_SUSPEND_VHCA_IN_OP_MOD_*."""

    SUSPEND_INITIATOR = 0
    SUSPEND_RESPONDER = 1


class ResumeOpMod(enum.IntEnum):
    """MLX5_RESUME_VHCA_IN_OP_MOD_* (note the numbering is swapped w.r.t. SUSPEND)."""

    RESUME_RESPONDER = 0
    RESUME_INITIATOR = 1


class QueryVhcaMigState(enum.IntEnum):
    """MLX5_QUERY_VHCA_MIG_STATE_* (query_vhca_migration_state_out.migration_state).

    The kernel names these and only tests for OPER_MIGRATION_INIT; the meaning of
    the others is this emulator's choice (README, "migration_state"):

    * UNINITIALIZED: no tracking session and the VF is not fully suspended.
    * OPER_MIGRATION_IDLE: tracking, nothing changed since the last tracked SAVE.
    * OPER_MIGRATION_READY: no tracking session and the VF is fully suspended:
      its state is frozen and a final SAVE captures all of it.
    * OPER_MIGRATION_DIRTY: tracking, state dirtied since the last tracked SAVE.
    * OPER_MIGRATION_INIT: tracking, and a reconfiguration changed objects (new
      initial data) that no tracked SAVE has captured yet (takes precedence
      over DIRTY).
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
    SEGMENT_REFUSED = 0x4657002B  # not a lone regular file of the right owner (README)
    SEGMENT_BUSY = 0x4657002C  # mapped for another principal's mkey
    INTERNAL = 0x465700F0  # the emulator itself failed (its log says how)
    INJECTED = 0x465700FF


# A PCI function level reset is no firmware command; the emulator runs it through
# the command path (lookup, stats, logs) under this number, above every 16-bit opcode.
FLR_OPCODE = 0x1_0000


def enum_name(cls: type[enum.IntEnum], value: int) -> str:
    """The member's name, or the number when the enum has no such member."""
    try:
        return cls(value).name
    except ValueError:
        return str(value)


def opcode_name(opcode: int) -> str:
    """An opcode's name for stats and logs (FLR_OPCODE included)."""
    return "FUNCTION_LEVEL_RESET" if opcode == FLR_OPCODE else enum_name(Opcode, opcode)


# Capabilities (cmd_hca_cap adv_virtualization: pg_track_*)
LOG_MIN_PAGE_SIZE = 12
LOG_MAX_PAGE_SIZE = 30
MAX_NUM_RANGES = 32
LOG_MIN_ADDR_SPACE = 12
LOG_MAX_ADDR_SPACE = 56


# The object kinds of a VF's object table (what a reconfiguration adds).
OBJ_TYPES: tuple[str, ...] = ("QP", "CQ", "MKEY", "EQ", "SRQ", "RQ", "SQ", "TIR", "TIS")


def obj_type_index(name: str) -> int:
    try:
        return OBJ_TYPES.index(name.upper() if name else "QP")
    except ValueError:
        raise ValueError(f"unknown object type {name!r}; one of {', '.join(OBJ_TYPES)}") from None


class ReconfigMode(enum.IntEnum):
    """What a reconfiguration does to a VF's objects (README, "Device state";
    the numbers are scenario.proto's ReconfigureMode, where 0 means ADD)."""

    ADD = 1  # append the objects: the state grows
    REPLACE = 2  # remove the oldest object and its neighbours, the new ones in their place
    REMOVE = 3  # remove the oldest objects (at least the objects' total size); add none


# ---------------------------------------------------------------------------
# Command results: the outbox of each command
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class CmdResult:
    """The outbox head: status and syndrome (0 = success)."""

    status: int = CmdStatus.OK
    syndrome: int = Syndrome.NONE
    diagnostic: str = ""
    # Emulator extension: an injected DELAY fault asks the adapter to answer later.
    delay_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == CmdStatus.OK


# A command's outbox type, for the code that handles commands.
R = TypeVar("R", bound="CmdResult")


@dataclass(slots=True)
class HcaCapResult(CmdResult):
    vhca_id: int = 0
    migration: bool = False
    adv_virtualization: bool = False
    migratable: bool = False
    migration_multi_load: bool = False
    migration_tracking_state: bool = False
    migration_in_chunks: bool = False
    migration_state: bool = False
    cap_type: int = CapType.GENERAL_DEVICE


@dataclass(slots=True)
class QueryResult(CmdResult):
    migration_state: int = QueryVhcaMigState.UNINITIALIZED
    required_umem_size: int = 0
    remaining_total_size: int = 0


@dataclass(slots=True)
class SaveAccepted(CmdResult):
    token: int = 0


@dataclass(slots=True)
class MkeyResult(CmdResult):
    mkey: int = 0


@dataclass(slots=True)
class PageTrackResult(CmdResult):
    obj_id: int = 0
    dirty: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SaveCompletion:
    token: int
    vhca_id: int
    status: int
    syndrome: int
    actual_image_size: int
    next_required_umem_size: int
    timestamp: float
    diagnostic: str = ""
    opcode: int = Opcode.SAVE_VHCA_STATE


CompletionCallback = Callable[[SaveCompletion], None]


# ---------------------------------------------------------------------------
# Commands: the inbox of each command (mlx5_ifc's *_in structs)
# ---------------------------------------------------------------------------

R_co = TypeVar("R_co", bound=CmdResult, covariant=True)


class Command(Generic[R_co]):
    """An inbox: its fields, the opcode and the outbox type it answers with
    (`class XIn(Command[XResult], opcode=...)`)."""

    __slots__ = ()
    opcode: ClassVar[int]
    out: ClassVar[type[CmdResult]]

    def __init_subclass__(cls, opcode: int | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if opcode is not None:
            cls.opcode = opcode
            cls.out = next(
                get_args(b)[0] for b in getattr(cls, "__orig_bases__", ()) if get_args(b)
            )

    def result(self, status: int, syndrome: int, diagnostic: str) -> R_co:
        """This command's outbox with a failure in its head."""
        return cast(R_co, self.out(status=status, syndrome=syndrome, diagnostic=diagnostic))


@dataclass(frozen=True, slots=True)
class VhcaCommand(Command[R_co]):
    """A command addressed to one function by vhca_id."""

    vhca_id: int


# Commands that name an mkey (CREATE/DESTROY_MKEY, SAVE, LOAD) also carry the
# principal of their caller: not on the wire, the firmware service fills in who
# it authenticated.  An mkey answers only commands of the principal that created
# it, as a real mkey answers only within its protection domain; to any other it
# does not exist (BAD_RES / UNKNOWN_MKEY).  None: a caller in this process (the
# embedded mode, tests), whose mkeys no principal reaches.


@dataclass(frozen=True, slots=True)
class QueryHcaCapIn(Command[HcaCapResult], opcode=Opcode.QUERY_HCA_CAP):
    op_mod: int
    other_function: bool = True
    function_id: int = 0


@dataclass(frozen=True, slots=True)
class SuspendVhcaIn(VhcaCommand[CmdResult], opcode=Opcode.SUSPEND_VHCA):
    op_mod: int = 0


@dataclass(frozen=True, slots=True)
class ResumeVhcaIn(VhcaCommand[CmdResult], opcode=Opcode.RESUME_VHCA):
    op_mod: int = 0


@dataclass(frozen=True, slots=True)
class QueryVhcaMigrationStateIn(VhcaCommand[QueryResult], opcode=Opcode.QUERY_VHCA_MIGRATION_STATE):
    op_mod: int = 0
    incremental: bool = False
    chunk: bool = False


@dataclass(frozen=True, slots=True)
class SaveVhcaStateIn(VhcaCommand[SaveAccepted], opcode=Opcode.SAVE_VHCA_STATE):
    op_mod: int = 0
    incremental: bool = False
    set_track: bool = False
    va: int = 0
    mkey: int = 0
    size: int = 0
    token: int = 0  # 0: the firmware picks one
    principal: str | None = None  # the caller (not on the wire)


@dataclass(frozen=True, slots=True)
class LoadVhcaStateIn(VhcaCommand[CmdResult], opcode=Opcode.LOAD_VHCA_STATE):
    op_mod: int = 0
    va: int = 0
    mkey: int = 0
    size: int = 0
    principal: str | None = None  # the caller (not on the wire)


@dataclass(frozen=True, slots=True)
class CreateMkeyIn(Command[MkeyResult], opcode=Opcode.CREATE_MKEY):
    """The memory itself stands for the PRM's translation entries."""

    view: memoryview
    owner: str = ""  # who cleans it up (a link, a client)
    principal: str | None = None  # whose it is


@dataclass(frozen=True, slots=True)
class DestroyMkeyIn(Command[CmdResult], opcode=Opcode.DESTROY_MKEY):
    mkey: int
    principal: str | None = None  # the caller


@dataclass(frozen=True, slots=True)
class CreatePageTrackIn(VhcaCommand[PageTrackResult], opcode=Opcode.CREATE_GENERAL_OBJECT):
    """CREATE_GENERAL_OBJECT of a page_track object."""

    ranges: tuple[tuple[int, int], ...] = ()  # (start address, length)
    log_page_size: int = 0


@dataclass(frozen=True, slots=True)
class ModifyPageTrackIn(VhcaCommand[PageTrackResult], opcode=Opcode.MODIFY_GENERAL_OBJECT):
    """MODIFY_GENERAL_OBJECT of a page_track object to report (and clear) its
    dirty pages in [range_start_address, + length)."""

    obj_id: int = 0
    range_start_address: int = 0
    length: int = 0


@dataclass(frozen=True, slots=True)
class DestroyPageTrackIn(VhcaCommand[CmdResult], opcode=Opcode.DESTROY_GENERAL_OBJECT):
    obj_id: int = 0


@dataclass(frozen=True, slots=True)
class FunctionLevelResetIn(VhcaCommand[CmdResult], opcode=FLR_OPCODE):
    """A PCI function level reset (no firmware command: see FLR_OPCODE)."""


# ---------------------------------------------------------------------------
# Scenario value types
# ---------------------------------------------------------------------------


class FirmwareError(Exception):
    """A scenario request the firmware cannot honour (not a command failure)."""


class NoSuchVf(FirmwareError):
    """No VF has that vhca_id (or none the caller may see: the same answer)."""

    def __init__(self, vhca_id: int) -> None:
        super().__init__(f"no VF with vhca_id {vhca_id}")
        self.vhca_id = vhca_id


@dataclass(slots=True)
class VfCaps:
    """Migration capability bits of the VF's firmware (all set = current firmware)."""

    migration: bool = True  # cmd_hca_cap.migration
    adv_virtualization: bool = True  # cmd_hca_cap.adv_virtualization
    migratable: bool = True  # cmd_hca_cap_2.migratable
    migration_multi_load: bool = True
    migration_tracking_state: bool = True
    migration_in_chunks: bool = True
    migration_state: bool = True  # the 2026 REINIT series

    def migration_capable(self) -> bool:
        """Whether the firmware does migration commands for this function at all.
        (mlx5vf asks for more before it enables migration: multi_load and
        tracking_state too; that is the driver's rule, not the firmware's.)"""
        return self.migration and self.migratable


@dataclass(slots=True)
class VfConfig:
    size: int = 4 * MiB
    seed: int | None = None  # None: derived from the firmware seed and the VF number
    dirty_bytes_per_s: int = 1 * MiB
    save_bandwidth: int = 0  # bytes/s; 0 = unlimited
    save_latency_s: float = 0.0
    chunk_size: int = 8 * MiB
    reconfig_bytes: int = 256 * KiB
    caps: VfCaps = field(default_factory=VfCaps)
    # Automatic reconfigurations: a Poisson process of this rate per second of
    # the VF's running time (0: none), each of reconfig_bytes in reconfig_mode.
    reconfig_rate_per_s: float = 0.0
    reconfig_mode: int = ReconfigMode.REPLACE  # a ReconfigMode (an int on the wire)

    MIN_SIZE = 1 * KiB
    MAX_SIZE = 16 << 30
    # Sanity bounds, not what the emulator can honour at speed: an absurd rate
    # or latency is a typo or a hostile client, refused with its field's name.
    MAX_RATE = 64 << 30  # bytes/s, dirty_bytes_per_s and save_bandwidth
    MAX_LATENCY_S = 3600.0
    MIN_CHUNK = PAGE_SIZE
    MAX_CHUNK = (1 << 32) - PAGE_SIZE
    MAX_RECONFIG_RATE = 1000.0  # automatic reconfigurations per second

    def validate(self) -> None:
        """Refuse a configuration with a field out of its range (ValueError
        naming the field and the range); checks only, changes nothing."""
        check_int("size", self.size, self.MIN_SIZE, self.MAX_SIZE)
        if self.seed is not None:
            check_int("seed", self.seed, 0, (1 << 64) - 1)
        check_int("dirty_bytes_per_s", self.dirty_bytes_per_s, 0, self.MAX_RATE)
        check_int("save_bandwidth", self.save_bandwidth, 0, self.MAX_RATE)
        check_float("save_latency_s", self.save_latency_s, 0.0, self.MAX_LATENCY_S)
        check_int("chunk_size", self.chunk_size, self.MIN_CHUNK, self.MAX_CHUNK)
        check_int("reconfig_bytes", self.reconfig_bytes, 1, self.MAX_SIZE)
        check_float("reconfig_rate_per_s", self.reconfig_rate_per_s, 0.0, self.MAX_RECONFIG_RATE)
        check_int("reconfig_mode", self.reconfig_mode, min(ReconfigMode), max(ReconfigMode))


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    """ValueError unless `value` is an int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi} (an integer), got {value!r}")


def check_float(name: str, value: object, lo: float, hi: float) -> None:
    """ValueError unless `value` is a finite number in [lo, hi] (NaN and ±inf
    fail the comparison)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g} (finite), got {value!r}")


class FaultKind(enum.IntEnum):
    FAIL = 1  # the command fails with status/syndrome
    DELAY = 2  # the command answers delay_s later
    DROP_COMPLETION = 3  # a SAVE's completion never arrives
    DELAY_COMPLETION = 4  # a SAVE's completion arrives delay_s later
    TRACKING_LOST = 5  # the tracking session is lost: the next incremental SAVE fails


COMMAND_OPCODES = frozenset(
    {
        Opcode.SUSPEND_VHCA,
        Opcode.RESUME_VHCA,
        Opcode.QUERY_VHCA_MIGRATION_STATE,
        Opcode.SAVE_VHCA_STATE,
        Opcode.LOAD_VHCA_STATE,
    }
)


@dataclass(slots=True)
class Fault:
    kind: FaultKind
    opcode: int = Opcode.SAVE_VHCA_STATE
    status: int = CmdStatus.INT_ERR
    syndrome: int = Syndrome.INJECTED
    delay_s: float = 0.0
    count: int = 1
    in_completion: bool = False
    fault_id: int = 0

    # Bounds of a scenario client's values (README, "Faults").
    MAX_DELAY_S: ClassVar[float] = 3600.0
    MAX_COUNT: ClassVar[int] = 1 << 20

    def validate(self) -> None:
        if not isinstance(self.kind, FaultKind):
            raise ValueError(f"kind must be one of {', '.join(k.name for k in FaultKind)}")
        check_int("count", self.count, 1, self.MAX_COUNT)
        if self.kind in (FaultKind.FAIL, FaultKind.DELAY) and self.opcode not in COMMAND_OPCODES:
            raise ValueError(
                f"opcode {self.opcode:#x} is not a migration command "
                f"(one of {', '.join(f'{o:#x}' for o in sorted(COMMAND_OPCODES))})"
            )
        check_int("opcode", self.opcode, 0, MAX_U16)
        check_int("status", self.status, 0, 0xFF)
        check_int("syndrome", self.syndrome, 0, MAX_U32)
        check_float("delay_s", self.delay_s, 0.0, self.MAX_DELAY_S)
        if self.kind == FaultKind.FAIL and self.status == 0:
            raise ValueError("a FAIL fault needs a non-zero 8-bit firmware status")
        if self.kind in (FaultKind.DELAY, FaultKind.DELAY_COMPLETION) and self.delay_s <= 0:
            raise ValueError("a delay fault needs delay_s > 0")
        if self.in_completion and not (
            self.kind == FaultKind.FAIL and self.opcode == Opcode.SAVE_VHCA_STATE
        ):
            raise ValueError("in_completion applies to SAVE_VHCA_STATE FAIL faults only")
        if self.kind in (FaultKind.DROP_COMPLETION, FaultKind.DELAY_COMPLETION):
            self.opcode = Opcode.SAVE_VHCA_STATE


@dataclass(frozen=True, slots=True)
class VfInfo:
    """A snapshot of one VF for scenario clients."""

    vf_id: int
    vhca_id: int
    function_id: int
    config: VfConfig
    initiator_suspended: bool
    responder_suspended: bool
    tracking: bool
    migration_state: int
    num_objects: int
    saved_bytes: int
    loaded_bytes: int
    reconfigurations: int
    save_in_flight: bool
    seed: int
    # Unique to this VF's life on this firmware: a VF removed and created
    # again in its slot (same vhca_id) is another device, as a hot-replugged
    # function is to the kernel.
    uid: str = ""
    state_size: int = 0  # bytes of device state now (objects and free space)

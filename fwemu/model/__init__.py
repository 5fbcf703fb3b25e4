"""The device model: pure Python, no gRPC.  Tests, benchmarks, the embedded mode
and the gRPC service all drive it directly."""

from .clock import Clock, LoopClock, VirtualClock
from .constants import CmdStatus, MigState, Opcode, ResumeOpMod, SuspendOpMod, Syndrome
from .faults import Fault, FaultKind
from .firmware import (
    CmdResult,
    Firmware,
    FirmwareError,
    HcaCapResult,
    QueryResult,
    SaveAccepted,
    SaveCompletion,
    VfInfo,
)
from .vf import Caps, Vf, VfConfig

__all__ = [
    "Caps",
    "Clock",
    "CmdResult",
    "CmdStatus",
    "Fault",
    "FaultKind",
    "Firmware",
    "FirmwareError",
    "HcaCapResult",
    "LoopClock",
    "MigState",
    "Opcode",
    "QueryResult",
    "ResumeOpMod",
    "SaveAccepted",
    "SaveCompletion",
    "SuspendOpMod",
    "Syndrome",
    "Vf",
    "VfConfig",
    "VfInfo",
    "VirtualClock",
]

"""The device model: pure Python, no gRPC.  Tests, benchmarks, the embedded mode
and the gRPC service all drive it directly.  Its value types (results,
statuses, configs, faults) are the interface's: fwemu.link.ifc."""

from .clock import Clock, LoopClock, VirtualClock
from .firmware import Firmware, vf_info
from .vf import Vf

__all__ = ["Clock", "Firmware", "LoopClock", "Vf", "VirtualClock", "vf_info"]

"""Caps on what scenario clients may leave queued on a VF (README, "Faults",
"Device state"): past them a request is refused with LimitReached, nothing
queued, so that a careless or hostile client cannot grow the firmware without
bound."""

from __future__ import annotations

from ..link.ifc import FirmwareError

MAX_ARMED_FAULTS = 1024  # armed faults per VF
MAX_PENDING_TRIGGERS = 1024  # scheduled reconfigurations per VF not yet run


class LimitReached(FirmwareError):
    """A per-VF cap is full (the service answers RESOURCE_EXHAUSTED)."""

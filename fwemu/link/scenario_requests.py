"""Scenario requests: what a ScenarioLink asks of the firmware, one in-struct
each like the commands' (fwemu.link.ifc).  They are no commands: a refused
request is a FirmwareError, not a syndrome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .ifc import Fault, VfConfig, VfInfo

# A request's answer type, for the code that handles requests.
A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)


class ScenarioRequest(Generic[A_co]):
    """A scenario request and the type of its answer (`class XIn(ScenarioRequest[int])`)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class VfRequest(ScenarioRequest[A_co]):
    """A request about one VF, named by its vhca_id."""

    vhca_id: int


@dataclass(frozen=True, slots=True)
class CreateVfsIn(ScenarioRequest[list[VfInfo]]):
    """Create `count` VFs alike; answers their snapshots."""

    count: int = 1
    config: VfConfig | None = None  # None: the firmware's defaults


@dataclass(frozen=True, slots=True)
class RemoveVfIn(VfRequest[None]):
    """Remove the VF (a SAVE in flight completes with ABORTED)."""


@dataclass(frozen=True, slots=True)
class ConfigureVfIn(VfRequest[VfInfo]):
    """Change VfConfig fields (not size) of a live VF."""

    changes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GetVfIn(VfRequest[VfInfo]):
    """A snapshot of the VF, brought up to the current time."""


@dataclass(frozen=True, slots=True)
class ListVfsIn(ScenarioRequest[list[VfInfo]]):
    """A snapshot of every VF, in vhca_id order."""


@dataclass(frozen=True, slots=True)
class ReconfigureIn(VfRequest[int]):
    """Add objects (type name, size; none: one QP of reconfig_bytes) now, at a
    firmware time or once that many image bytes were saved; answers the trigger id."""

    objects: tuple[tuple[str, int], ...] = ()
    at_time: float | None = None
    after_saved_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class InjectFaultIn(VfRequest[int]):
    """Arm a fault on the VF; answers its fault id."""

    fault: Fault


@dataclass(frozen=True, slots=True)
class ClearFaultsIn(VfRequest[int]):
    """Disarm the VF's faults; answers how many were armed."""


@dataclass(frozen=True, slots=True)
class GetDigestIn(VfRequest[str]):
    """The digest of the VF's state, brought up to the current time."""


@dataclass(frozen=True, slots=True)
class ApplyScenarioIn(ScenarioRequest[list[VfInfo]]):
    """Apply a scenario file's text (fwemu.scenario); answers the VFs it created."""

    text: str


@dataclass(frozen=True, slots=True)
class GetClockIn(ScenarioRequest[float]):
    """The firmware clock's time (seconds)."""


@dataclass(frozen=True, slots=True)
class AdvanceClockIn(ScenarioRequest[float]):
    """Move a virtual clock forward; answers the new time."""

    seconds: float

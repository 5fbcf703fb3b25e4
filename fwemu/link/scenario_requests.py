"""Scenario requests: what a ScenarioLink asks of the firmware, one in-struct
each like the commands' (fwemu.link.ifc).  They are no commands: a refused
request is a FirmwareError, not a syndrome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .ifc import (
    MAX_U16,
    Fault,
    MiB,
    ReconfigMode,
    VfConfig,
    VfInfo,
    check_float,
    check_int,
    obj_type_index,
)

# A request's answer type, for the code that handles requests.
A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)


# Bounds of what one request may ask (README, "Scenario files").
MAX_RECONFIG_OBJECTS = 1024
MAX_SCENARIO_TEXT = 1 * MiB  # characters
MAX_AT_TIME = 1e9  # seconds of firmware time (about 31 years)
MAX_AFTER_SAVED_BYTES = 1 << 60
MAX_ADVANCE_S = 86400.0 * 366


def reconfig_mode(value: int | str) -> ReconfigMode:
    """A mode from its number or its name (any case): ValueError naming the
    modes otherwise."""
    try:
        if isinstance(value, str):
            return ReconfigMode[value.strip().upper()]
        if isinstance(value, bool):
            raise ValueError
        return ReconfigMode(value)
    except (KeyError, ValueError):
        names = ", ".join(m.name for m in ReconfigMode)
        raise ValueError(
            f"reconfiguration mode must be one of {names} "
            f"({', '.join(str(int(m)) for m in ReconfigMode)}), got {value!r}"
        ) from None


class ScenarioRequest(Generic[A_co]):
    """A scenario request and the type of its answer (`class XIn(ScenarioRequest[int])`)."""

    __slots__ = ()

    def validate(self) -> None:
        """ValueError naming the field and its range if a value is out of
        bounds; checks only (the firmware checks what depends on its state)."""


@dataclass(frozen=True, slots=True)
class VfRequest(ScenarioRequest[A_co]):
    """A request about one VF, named by its vhca_id."""

    vhca_id: int


@dataclass(frozen=True, slots=True)
class CreateVfsIn(ScenarioRequest[list[VfInfo]]):
    """Create `count` VFs alike; answers their snapshots."""

    count: int = 1
    config: VfConfig | None = None  # None: the firmware's defaults

    def validate(self) -> None:
        check_int("count", self.count, 1, MAX_U16)
        if self.config is not None:
            self.config.validate()


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
    """A snapshot of every VF, in vhca_id order; with `function_ids`, of the
    VFs with those function ids only (the others are not brought up to the
    current time either)."""

    function_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        check_function_ids(len(self.function_ids))


# Every function id a VF can have (16 bits), each once: a longer list (up to
# the 64 MiB message limit, 64M one-byte ids) only costs the firmware memory.
MAX_LIST_FUNCTION_IDS = MAX_U16 + 1


def check_function_ids(count: int) -> None:
    """ValueError if a ListVfs names more function ids than there can be."""
    if count > MAX_LIST_FUNCTION_IDS:
        raise ValueError(f"function_ids: at most {MAX_LIST_FUNCTION_IDS} ids, got {count}")


@dataclass(frozen=True, slots=True)
class ReconfigureIn(VfRequest[int]):
    """Reconfigure the VF now, at a firmware time or once that many image bytes
    were saved; answers the trigger id.  `objects` (type name, size; none: one
    QP of reconfig_bytes) are added (`mode` ADD), put in the place of the
    oldest objects (REPLACE), or say how many bytes of the oldest objects go
    (REMOVE)."""

    objects: tuple[tuple[str, int], ...] = ()
    at_time: float | None = None
    after_saved_bytes: int | None = None
    mode: int = ReconfigMode.ADD  # a ReconfigMode

    def validate(self) -> None:
        reconfig_mode(self.mode)
        if len(self.objects) > MAX_RECONFIG_OBJECTS:
            raise ValueError(
                f"objects: at most {MAX_RECONFIG_OBJECTS} per reconfiguration, "
                f"got {len(self.objects)}"
            )
        for i, (kind, size) in enumerate(self.objects):
            obj_type_index(kind)
            check_int(f"objects[{i}].size", size, 1, VfConfig.MAX_SIZE)
        if self.at_time is not None:
            check_float("at_time", self.at_time, 0.0, MAX_AT_TIME)
        if self.after_saved_bytes is not None:
            check_int("after_saved_bytes", self.after_saved_bytes, 0, MAX_AFTER_SAVED_BYTES)


@dataclass(frozen=True, slots=True)
class ResetVfIn(VfRequest[VfInfo]):
    """Put the VF back to the state it was created in (README, "Scenario
    files"): its snapshot after."""


@dataclass(frozen=True, slots=True)
class InjectFaultIn(VfRequest[int]):
    """Arm a fault on the VF; answers its fault id."""

    fault: Fault

    def validate(self) -> None:
        self.fault.validate()


@dataclass(frozen=True, slots=True)
class ClearFaultsIn(VfRequest[int]):
    """Disarm the VF's faults; answers how many were armed."""


MAX_HOLDERS = 1024  # principals holding one VF's device open
MAX_PRINCIPAL_LEN = 1024


@dataclass(frozen=True, slots=True)
class SetVfHoldersIn(VfRequest[None]):
    """Which principals hold the VF's device open (a driver says it; README,
    "Security"): they may use Scenario on the VF.  Empty: nobody."""

    principals: frozenset[str] = frozenset()

    def validate(self) -> None:
        if len(self.principals) > MAX_HOLDERS:
            raise ValueError(f"principals: at most {MAX_HOLDERS}")
        for p in self.principals:
            if not 0 < len(p) <= MAX_PRINCIPAL_LEN:
                raise ValueError(f"principals: each 1 to {MAX_PRINCIPAL_LEN} characters")


@dataclass(frozen=True, slots=True)
class GetDigestIn(VfRequest[str]):
    """The digest of the VF's state, brought up to the current time; with
    `suspended`, of the state it had while it was last suspended ("" if it
    never was)."""

    suspended: bool = False


@dataclass(frozen=True, slots=True)
class ApplyScenarioIn(ScenarioRequest[list[VfInfo]]):
    """Apply a scenario file's text (fwemu.scenario); answers the VFs it created."""

    text: str

    def validate(self) -> None:
        if len(self.text) > MAX_SCENARIO_TEXT:
            raise ValueError(
                f"text: a scenario is at most {MAX_SCENARIO_TEXT} characters, got {len(self.text)}"
            )


@dataclass(frozen=True, slots=True)
class GetClockIn(ScenarioRequest[float]):
    """The firmware clock's time (seconds)."""


@dataclass(frozen=True, slots=True)
class AdvanceClockIn(ScenarioRequest[float]):
    """Move a virtual clock forward; answers the new time."""

    seconds: float

    def validate(self) -> None:
        check_float("seconds", self.seconds, 0.0, MAX_ADVANCE_S)

"""The driver's events as clients see them: the payload of each kind and the
envelope (`Event`).  The Events RPC carries these (vfio.proto's Event oneof);
the driver's bus (driver/events.py) publishes them and the client library
(vfioclient) decodes into them, so both share this one definition."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class StateChanged:
    """One arc of the VFIO FSM (a SET may walk several), or a reset."""

    kind: ClassVar[str] = "state_change"
    from_state: str
    to_state: str
    reset: bool = False  # VFIO_DEVICE_RESET put it back to RUNNING (not an arc)


@dataclass(frozen=True, slots=True)
class PrecopyAnswered:
    """A VFIO_MIG_GET_PRECOPY_INFO answer."""

    kind: ClassVar[str] = "precopy_info"
    initial_bytes: int
    dirty_bytes: int
    flags: int
    version: int  # 2 after the MIG_PRECOPY_INFOv2 opt-in, else 1 (flags echo the caller's)
    reinit: bool


@dataclass(frozen=True, slots=True)
class SaveCompleted:
    kind: ClassVar[str] = "save_completed"
    image_bytes: int


@dataclass(frozen=True, slots=True)
class SaveFailed:
    kind: ClassVar[str] = "save_failed"
    status: int  # the firmware status byte, or -errno


@dataclass(frozen=True, slots=True)
class ErrorAnswered:
    """The service answered a call with an errno."""

    kind: ClassVar[str] = "error"
    errno: int
    errno_name: str
    operation: str  # "read", "write", "set_state", "precopy_info", "device_feature", ...
    message: str


@dataclass(frozen=True, slots=True)
class Finding:
    """An audit finding (driver/audit.py): something a client did that would
    go wrong, or slow, on a real device."""

    kind: ClassVar[str] = "audit"
    rule: str
    device: str
    time: float
    client: str
    message: str
    reference: str
    data_fd: int = -1
    stream: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Dropped:
    """The subscriber fell behind and lost `count` older events."""

    kind: ClassVar[str] = "dropped"
    count: int


Payload = (
    StateChanged | PrecopyAnswered | SaveCompleted | SaveFailed | ErrorAnswered | Finding | Dropped
)

# kind -> payload class (the kinds are the Event oneof's field names in vfio.proto)
PAYLOADS: dict[str, type[Payload]] = {
    p.kind: p
    for p in (
        StateChanged,
        PrecopyAnswered,
        SaveCompleted,
        SaveFailed,
        ErrorAnswered,
        Finding,
        Dropped,
    )
}


@dataclass(frozen=True, slots=True)
class Event:
    time: float  # unix seconds
    device: str  # PCI name ("" for errors on no device, Dropped of an unfiltered subscriber)
    payload: Payload
    client: str = ""  # x-vfio-client of the call it came from
    data_fd: int = -1  # in that client's table, when known
    stream: int = 0  # the device's migration file number

    @property
    def kind(self) -> str:
        return self.payload.kind

    def to_dict(self) -> dict[str, Any]:
        """Flat: the envelope, `kind`, then the payload's fields."""
        out: dict[str, Any] = {
            "time": self.time,
            "device": self.device,
            "kind": self.kind,
            "client": self.client,
            "data_fd": self.data_fd,
            "stream": self.stream,
        }
        for k, v in asdict(self.payload).items():
            out.setdefault(k, v)
        return out

"""What happens on the devices, for whoever follows: state changes, precopy
info answers, SAVE completions and failures, errno answers and audit
findings, in the spirit of QEMU's VFIO_MIGRATION events.  Pure (no gRPC): the
service streams them, tests read them directly.

The bus never waits for a subscriber: each has a bounded queue, and when it
is full the oldest event goes (counted); the subscriber then first gets a
`Dropped` marker saying how many it lost.  Publishing is one length check
when nobody listens, else O(subscribers).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

# The x-vfio-client of the call being served ("" outside calls).  Tasks a call
# starts (SAVE completions, chunk workers) inherit it.
CALLER: ContextVar[str] = ContextVar("vfio_caller", default="")

DEFAULT_QUEUE = 1024


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


class Subscription:
    """One subscriber's bounded queue; iterate it (ends when closed)."""

    def __init__(self, bus: EventBus, device: str | None, maxsize: int) -> None:
        self.bus = bus
        self.device = device
        self.maxsize = max(1, maxsize)
        self.dropped = 0  # in all
        self._unreported = 0  # dropped since the last Dropped marker
        self._queue: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False

    def offer(self, event: Event) -> None:
        if self.device is not None and event.device != self.device:
            return
        if len(self._queue) >= self.maxsize:
            self._queue.popleft()
            self.dropped += 1
            self._unreported += 1
            self.bus.dropped += 1
        self._queue.append(event)
        self._wake()

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def pending(self) -> int:
        """Events `get` would return now without waiting (a marker included)."""
        return len(self._queue) + bool(self._unreported)

    def close(self) -> None:
        """Stop: the iteration ends once what is queued was taken."""
        if not self.closed:
            self.closed = True
            self.bus.unsubscribe(self)
            self._wake()

    async def get(self) -> Event | None:
        """The next event (a Dropped marker first if some were lost); None
        once closed and empty."""
        while True:
            if self._unreported:
                n, self._unreported = self._unreported, 0
                return Event(self.bus.clock(), self.device or "", Dropped(n))
            if self._queue:
                return self._queue.popleft()
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        ev = await self.get()
        if ev is None:
            raise StopAsyncIteration
        return ev

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """One per driver service (the registry owns it)."""

    def __init__(
        self, *, queue_size: int = DEFAULT_QUEUE, clock: Callable[[], float] = time.time
    ) -> None:
        self.queue_size = queue_size
        self.clock = clock
        self.subscribers: list[Subscription] = []
        self.published = 0  # events offered to at least one subscriber
        self.dropped = 0  # events some subscriber lost

    def subscribe(self, device: str | None = None, *, maxsize: int | None = None) -> Subscription:
        sub = Subscription(self, device, self.queue_size if maxsize is None else maxsize)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def publish(
        self,
        device: str,
        payload: Payload,
        *,
        client: str | None = None,
        data_fd: int = -1,
        stream: int = 0,
        at: float | None = None,
    ) -> None:
        """Offer an event to every subscriber; `client` defaults to the
        caller of the call being served, `at` to now.  Callers building a
        costly payload check `subscribers` first."""
        if not self.subscribers:
            return
        event = Event(
            self.clock() if at is None else at,
            device,
            payload,
            CALLER.get() if client is None else client,
            data_fd,
            stream,
        )
        self.published += 1
        for sub in self.subscribers:
            sub.offer(event)

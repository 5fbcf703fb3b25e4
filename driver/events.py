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

from .api.events import (
    PAYLOADS,
    Dropped,
    ErrorAnswered,
    Event,
    Finding,
    Payload,
    PrecopyAnswered,
    SaveCompleted,
    SaveFailed,
    StateChanged,
)

__all__ = [
    "CALLER",
    "PAYLOADS",
    "Dropped",
    "ErrorAnswered",
    "Event",
    "EventBus",
    "Finding",
    "Payload",
    "PrecopyAnswered",
    "SaveCompleted",
    "SaveFailed",
    "StateChanged",
    "Subscription",
]

# The x-vfio-client of the call being served ("" outside calls).  Tasks a call
# starts (SAVE completions, chunk workers) inherit it.
CALLER: ContextVar[str] = ContextVar("vfio_caller", default="")

DEFAULT_QUEUE = 1024


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

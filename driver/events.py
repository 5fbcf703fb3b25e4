"""What happens on the devices, for whoever follows: state changes, precopy
info answers, SAVE completions and failures, errno answers and audit
findings, in the spirit of QEMU's VFIO_MIGRATION events.  Pure (no gRPC): the
service streams them, tests read them directly.

The bus never waits for a subscriber: each has a bounded queue, and when it
is full the oldest event goes (counted); the subscriber then first gets a
`Dropped` marker saying how many it lost.  Publishing is one length check
when nobody listens, else O(subscribers of that device + unfiltered ones):
subscribers of other devices cost nothing.  Subscribers are bounded per
client (EMFILE past it) and in all (ENFILE), as fds per process and files
per system.
"""

from __future__ import annotations

import asyncio
import errno
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
from .vfio.errors import VfioError

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
MAX_SUBSCRIBERS = 1024  # Events streams in all
MAX_SUBSCRIBERS_PER_CLIENT = 16


class Subscription:
    """One subscriber's bounded queue; iterate it (ends when closed)."""

    def __init__(self, bus: EventBus, device: str | None, maxsize: int, client: str = "") -> None:
        self.bus = bus
        self.device = device
        self.client = client
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
        self,
        *,
        queue_size: int = DEFAULT_QUEUE,
        clock: Callable[[], float] = time.time,
        max_subscribers: int = MAX_SUBSCRIBERS,
        max_per_client: int = MAX_SUBSCRIBERS_PER_CLIENT,
    ) -> None:
        self.queue_size = queue_size
        self.clock = clock
        self.max_subscribers = max_subscribers
        self.max_per_client = max_per_client
        self.subscribers: list[Subscription] = []
        # Who publish offers an event of a device to: that device's
        # subscribers and the unfiltered ones (key None); insertion-ordered.
        self._by_device: dict[str | None, dict[Subscription, None]] = {}
        self._per_client: dict[str, int] = {}
        self.published = 0  # events offered to at least one subscriber
        self.offered = 0  # subscriber queues events were offered to
        self.dropped = 0  # events some subscriber lost

    def subscribe(
        self, device: str | None = None, *, maxsize: int | None = None, client: str = ""
    ) -> Subscription:
        """A new subscriber (of `device`'s events, or of all); EMFILE past
        max_per_client for `client`, ENFILE past max_subscribers."""
        held = self._per_client.get(client, 0)
        if held >= self.max_per_client:
            raise VfioError(errno.EMFILE, f"{held} event subscriptions of this client")
        if len(self.subscribers) >= self.max_subscribers:
            raise VfioError(errno.ENFILE, f"{len(self.subscribers)} event subscriptions in all")
        sub = Subscription(self, device, self.queue_size if maxsize is None else maxsize, client)
        self.subscribers.append(sub)
        self._by_device.setdefault(device, {})[sub] = None
        self._per_client[client] = held + 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub not in self.subscribers:
            return
        self.subscribers.remove(sub)
        subs = self._by_device[sub.device]
        del subs[sub]
        if not subs:
            del self._by_device[sub.device]
        left = self._per_client[sub.client] - 1
        if left:
            self._per_client[sub.client] = left
        else:
            del self._per_client[sub.client]

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
        for key in (device, None):
            subs = self._by_device.get(key)
            if subs:
                self.offered += len(subs)
                for sub in subs:
                    sub.offer(event)

"""What happens on the devices, for whoever follows: state changes, precopy
info answers, SAVE completions and failures, errno answers and audit
findings, in the spirit of QEMU's VFIO_MIGRATION events.  Pure (no gRPC): the
service streams them, tests read them directly.

The bus never waits for a subscriber: each has a bounded queue, and when it
is full the oldest event goes (counted); the subscriber then first gets a
`Dropped` marker saying how many it lost.  Publishing is one length check
when nobody listens, else O(subscribers of that device + unfiltered ones
that may see it): subscribers of other devices, and other principals'
unfiltered ones, cost nothing.  Subscribers are bounded per client (EMFILE
past it) and in all (ENFILE), as fds per process and files per system.

Who sees what (README, "Principals and owned devices"): a subscriber that
sees everything (an admin, the one principal of a service without client
certificates) gets every event it asked for.  Any other principal gets an
event of a device only while it holds the device open, and only if the
event came from its own calls or from the driver itself (no caller: a
completion the firmware aborted, say); an event of no device only if it
came from its own calls.  So no principal sees another's client ids.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

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
    "PRINCIPAL",
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

# The x-vfio-client of the call being served ("" outside calls), and the
# principal that made the call (grpcsvc.tls.principal; "" outside calls).
# Tasks a call starts (SAVE completions, chunk workers) inherit both.
CALLER: ContextVar[str] = ContextVar("vfio_caller", default="")
PRINCIPAL: ContextVar[str] = ContextVar("vfio_principal", default="")

DEFAULT_QUEUE = 1024
MAX_SUBSCRIBERS = 1024  # Events streams in all
MAX_SUBSCRIBERS_PER_CLIENT = 16


# Which principal holds a device open (None: nobody), for the bus's filter.
HolderOf = Callable[[str], str | None]


def caller() -> tuple[str, str]:
    """(principal, x-vfio-client) of the call being served: one client's
    key in per-client tables (a client id names a process within its
    principal only)."""
    return PRINCIPAL.get(), CALLER.get()


def _nobody(device: str) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class _Own:
    """The key of a principal's unfiltered subscribers that do not see everything."""

    principal: str


class Subscription:
    """One subscriber's bounded queue; iterate it (ends when closed)."""

    def __init__(
        self,
        bus: EventBus,
        device: str | None,
        maxsize: int,
        client: str = "",
        principal: str = "",
        *,
        sees_all: bool = True,
    ) -> None:
        """`client` of `principal` subscribed; unless it `sees_all`, it sees
        only what its principal may (module docstring)."""
        self.bus = bus
        self.device = device
        self.client = client
        self.principal = principal
        self.sees_all = sees_all
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
        holder_of: HolderOf = _nobody,
    ) -> None:
        """`holder_of(device)`: the principal holding the device open
        (the registry's), for subscribers that do not see everything."""
        self.queue_size = queue_size
        self.clock = clock
        self.max_subscribers = max_subscribers
        self.max_per_client = max_per_client
        self.holder_of = holder_of
        self.subscribers: list[Subscription] = []
        # Who publish offers an event of a device to: that device's
        # subscribers, the unfiltered ones that see everything (key None)
        # and the unfiltered ones of the principal who may see it (key
        # _Own(principal)); insertion-ordered.
        self._by_key: dict[str | _Own | None, dict[Subscription, None]] = {}
        self._per_client: dict[tuple[str, str], int] = {}
        self.published = 0  # events offered to at least one subscriber
        self.offered = 0  # subscriber queues events were offered to
        self.dropped = 0  # events some subscriber lost

    def subscribe(
        self,
        device: str | None = None,
        *,
        maxsize: int | None = None,
        client: str = "",
        principal: str = "",
        sees_all: bool = True,
    ) -> Subscription:
        """A new subscriber (of `device`'s events, or of all) for `client`
        of `principal`, that sees every event or (not `sees_all`) what its
        principal may; EMFILE past max_per_client for that client, ENFILE
        past max_subscribers."""
        key = (principal, client)
        held = self._per_client.get(key, 0)
        if held >= self.max_per_client:
            raise VfioError(errno.EMFILE, f"{held} event subscriptions of this client")
        if len(self.subscribers) >= self.max_subscribers:
            raise VfioError(errno.ENFILE, f"{len(self.subscribers)} event subscriptions in all")
        maxsize = self.queue_size if maxsize is None else maxsize
        sub = Subscription(self, device, maxsize, client, principal, sees_all=sees_all)
        self.subscribers.append(sub)
        self._by_key.setdefault(_key(sub), {})[sub] = None
        self._per_client[key] = held + 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub not in self.subscribers:
            return
        self.subscribers.remove(sub)
        subs = self._by_key[_key(sub)]
        del subs[sub]
        if not subs:
            del self._by_key[_key(sub)]
        client = (sub.principal, sub.client)
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]

    def publish(
        self,
        device: str,
        payload: Payload,
        *,
        client: str | None = None,
        principal: str | None = None,
        data_fd: int = -1,
        stream: int = 0,
        at: float | None = None,
    ) -> None:
        """Offer an event to every subscriber that may see it; `client` and
        `principal` default to the call being served's, `at` to now.
        Callers building a costly payload check `subscribers` first."""
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
        scope = self._scope(device, PRINCIPAL.get() if principal is None else principal)
        self.published += 1
        for key in (device, None):
            subs = self._by_key.get(key)
            if subs:
                for sub in subs:
                    if sub.sees_all or sub.principal == scope:
                        self.offered += 1
                        sub.offer(event)
        own = self._by_key.get(_Own(scope)) if scope is not None else None
        if own:
            self.offered += len(own)
            for sub in own:
                sub.offer(event)

    def _scope(self, device: str, principal: str) -> str | None:
        """The one principal, besides those who see everything, that may see
        an event of `device` from a call of `principal` ("": the driver's own)."""
        if not device:
            return principal or None
        holder = self.holder_of(device)
        return holder if holder is not None and principal in (holder, "") else None


def _key(sub: Subscription) -> str | _Own | None:
    """Where the bus files `sub`: by its device; unfiltered, apart by principal
    unless it sees everything."""
    if sub.device is None and not sub.sees_all:
        return _Own(sub.principal)
    return sub.device

"""The firmware's completion EQ: SAVE completions go to the subscribers that
watch their function, or wait in a bounded backlog until one subscribes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..link.ifc import CompletionCallback, SaveCompletion


@dataclass(slots=True)
class _Subscriber:
    callback: CompletionCallback
    vhca_ids: frozenset[int] | None

    def wants(self, c: SaveCompletion) -> bool:
        return self.vhca_ids is None or c.vhca_id in self.vhca_ids


class CompletionQueue:
    BACKLOG = 4096

    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self._backlog: deque[SaveCompletion] = deque(maxlen=self.BACKLOG)

    def subscribe(
        self, callback: CompletionCallback, vhca_ids: Iterable[int] | None = None
    ) -> Callable[[], None]:
        """Receive SAVE completions (backlogged ones first).  Returns unsubscribe."""
        sub = _Subscriber(callback, frozenset(vhca_ids) if vhca_ids else None)
        self._subscribers.append(sub)
        keep: deque[SaveCompletion] = deque(maxlen=self.BACKLOG)
        while self._backlog:
            c = self._backlog.popleft()
            if sub.wants(c):
                callback(c)
            else:
                keep.append(c)
        self._backlog = keep

        def unsubscribe() -> None:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

        return unsubscribe

    def deliver(self, c: SaveCompletion) -> None:
        delivered = False
        for sub in list(self._subscribers):
            if sub.wants(c):
                sub.callback(c)
                delivered = True
        if not delivered:
            self._backlog.append(c)

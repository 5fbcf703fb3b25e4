"""The in-process migration stream between a device's source half and its
destination half, standing in for QEMU's: chunks of data in order, the
INIT_DATA_SENT marker, the end marker."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any

from ..calls import MAX_SPANS
from ..usermem import Slot
from .report import MigrationError


class Marker(enum.Enum):
    END = "end"


@dataclass(frozen=True)
class InitDataSent:
    generation: int


Chunk = bytes | Slot  # migration data: bytes, or a slot of user memory holding it
StreamItem = Chunk | InitDataSent | Marker


async def put(q: asyncio.Queue[Any], item: Any, consumer: asyncio.Future[Any]) -> None:
    """Queue `item` for `consumer`, waiting for room; if the consumer ends
    first, raise what it failed with (a bounded queue would wait forever)."""
    if not consumer.done():
        try:
            q.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        putting = asyncio.ensure_future(q.put(item))
        await asyncio.wait({putting, consumer}, return_when=asyncio.FIRST_COMPLETED)
        if putting.done():
            return
        putting.cancel()
    consumer.result()  # raises its error
    raise MigrationError("the destination stopped taking data")


def stop_copy_batch(slots: int) -> int:
    """The stop-copy reads (at the source) or writes (at the destination)
    that go in one request (`then`): a quarter of the slots, so a short
    stop-copy still overlaps its reads with its sends, at most MAX_SPANS."""
    return max(1, min(slots // 4, MAX_SPANS))

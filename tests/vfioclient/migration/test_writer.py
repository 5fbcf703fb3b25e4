"""The destination's DataWriter on user memory (vfioclient/migration/writer.py):
`flush` returns once every write in flight is answered and keeps the
WriteFromStream open for the writes to come (a new call waits behind every
other client's new calls on a busy driver); `end` ends it; a failed write
surfaces at the flush.  Against a stand-in call whose answers the test gives."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from vfioclient.calls import VfioClientError
from vfioclient.migration.writer import DataWriter
from vfioclient.usermem import Slots


class Memory:
    """A SharedSegment as Slots uses it, mapped in every client at 0x10000."""

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))

    def __len__(self) -> int:
        return len(self.view)

    def addr(self, client: object) -> int:
        return 0x10000


class Call:
    """A WriteFromStream: the spans submitted; answers as the test gives them."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self.answers: asyncio.Queue[int | VfioClientError | None] = asyncio.Queue()
        self.writing_closed = False

    async def submit_many(self, spans: list[tuple[int, int]]) -> None:
        self.spans.extend(spans)

    async def result(self) -> int | None:
        a = await self.answers.get()
        if isinstance(a, VfioClientError):
            raise a
        return a

    async def close_writing(self) -> None:
        self.writing_closed = True
        self.answers.put_nowait(None)  # the driver ends the call OK

    def cancel(self) -> None:
        self.answers.put_nowait(None)


class Client:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def write_from_stream(self, fd: int) -> Call:
        self.calls.append(Call())
        return self.calls[-1]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def write(writer: DataWriter, slots: Slots) -> None:
    slot = await slots.acquire()
    slot.length = 16
    await writer.write_many([slot])


async def test_flush_waits_for_the_answers_and_keeps_the_call_open() -> None:
    client, slots = Client(), Slots(Memory(64), 16, 4)  # type: ignore[arg-type]
    writer = DataWriter(client, 5, 4)  # type: ignore[arg-type]
    await write(writer, slots)
    await write(writer, slots)
    (call,) = client.calls
    flushed: asyncio.Future[Any] = asyncio.ensure_future(writer.flush())
    call.answers.put_nowait(16)
    await settle()
    assert not flushed.done() and slots.in_use == 1  # one write still unanswered
    call.answers.put_nowait(16)
    await asyncio.wait_for(flushed, 5)
    assert slots.in_use == 0 and not call.writing_closed
    await write(writer, slots)  # after the flush: the same call
    assert len(client.calls) == 1 and len(call.spans) == 3
    call.answers.put_nowait(16)
    await asyncio.wait_for(writer.end(), 5)
    assert call.writing_closed and slots.in_use == 0


async def test_a_write_that_failed_surfaces_at_the_flush() -> None:
    client, slots = Client(), Slots(Memory(64), 16, 4)  # type: ignore[arg-type]
    writer = DataWriter(client, 5, 4)  # type: ignore[arg-type]
    await write(writer, slots)
    (call,) = client.calls
    call.answers.put_nowait(VfioClientError(errno.EIO, "LOAD failed"))
    with pytest.raises(VfioClientError) as caught:
        await asyncio.wait_for(writer.flush(), 5)
    assert caught.value.errno == errno.EIO and slots.in_use == 0

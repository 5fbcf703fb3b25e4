"""The precopy's read(2)s on one ReadIntoStream kept open: a read per
iteration costs a message each way on an open stream instead of a unary
ReadInto call (call set-up, metadata, status).  One read at a time, as
QEMU's migration thread makes them, so the driver sees the same reads in
the same order.

A failed read (ENOMSG, "empty for now", is routine in PRE_COPY) ends the
call as the stream's rules would go on refusing it (ECANCELED): the call is
half-closed and its OK status read in the background, never cancelled (a
cancelled ReadIntoStream leaks native memory in the driver's grpc.aio,
grpc/grpc#43360), and the next read opens another."""

from __future__ import annotations

import asyncio
import contextlib
import errno

from ..client import ReadIntoCall, VfioClient, VfioClientError


class ReadLane:
    def __init__(self, client: VfioClient, fd: int) -> None:
        self.client, self.fd = client, fd
        self._call: ReadIntoCall | None = None
        self._ending: set[asyncio.Task[None]] = set()

    async def read_into(self, addr: int, count: int) -> int:
        """read(fd, addr, count): the bytes read; VfioClientError as ReadInto."""
        call = self._call
        if call is None:
            call = self._call = self.client.read_into_stream(self.fd)
        try:
            await call.submit(addr, count)
            n = await call.result()
        except VfioClientError:
            self._end()
            raise
        except BaseException:  # cancelled mid-read: the call cannot be trusted in order
            self._call = None
            call.cancel()
            raise
        if n is None:
            self._call = None
            raise VfioClientError(errno.EPIPE, "the read stream ended")
        return n

    def close_soon(self) -> None:
        """No more reads: the call is ended in the background (see `close`)."""
        self._end()

    def _end(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            task = asyncio.ensure_future(_close(call))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def close(self) -> None:
        """No more reads: the call ended, and every earlier one."""
        self._end()
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)


async def _close(call: ReadIntoCall) -> None:
    """Half-close and read to its end (the driver answers what is left, then OK)."""
    try:
        await call.close_writing()
        while await call.result() is not None:
            pass
    except (VfioClientError, asyncio.InvalidStateError):
        with contextlib.suppress(Exception):
            call.cancel()

"""DeviceFeature, PrecopyInfo and CloseFd over the driver's Ioctl streams.

A unary gRPC call costs several times what one message each way on an open
stream does (grpc.aio: call set-up, metadata, status), and a migration makes
an ioctl after every precopy read (QEMU's pending_exact: MIG_DATA_SIZE, then
PRECOPY_INFO).  So the async client carries those two RPCs on Ioctl streams
(vfio.proto): each stream, a *lane*, carries one ioctl at a time, as one
thread makes them, and the client opens as many lanes as it has ioctls in
flight (up to MAX_LANES; beyond them, unary calls), so ioctls on different
devices run side by side as they do on the unary RPCs.  The answers are the
unary RPCs' own, errnos included (in band).  close(2) goes on them too: a
busy driver takes up a new call only after every other client's new calls
before it (100-500 ms with 64 migrations at once), and an orchestrator closes
the destination's data fd in its downtime.  A driver from before that answers
a close EINVAL, operation "ioctl", having done nothing (NEWER_FIELDS): the
close is made as the unary call, and so are the later ones.

A driver without the Ioctl RPC (UNIMPLEMENTED, before it ran anything) turns
the lanes off: the call is made again as a unary call, and so are the rest; a
stream refused with EAGAIN (the driver's limit of streams per client) makes
that one call a unary call.
`sequence` makes several ioctls one after another, as one thread makes
them (QEMU's pending_exact: MIG_DATA_SIZE, then PRECOPY_INFO, whatever the
first answered): it writes them all on one lane at once and reads their
answers, so they cost one round trip; the driver still runs each only after
the one before it ended, in the order sent, so the device sees what the
thread's syscalls would make it see.

A caller cancelled while its ioctl is on a lane takes the lane down with it
(the ioctl runs to its end on the driver, as a unary call's does); a broken
stream fails its one ioctl with the unary path's errno (ENOTCONN, EIO) and
the next ioctl opens a fresh lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from driver.api.v1 import vfio_pb2 as pb

from .calls import VfioClientError
from .calls import rpc_error as _error

IOCTL_METHOD = "/vfio.v1.Vfio/Ioctl"
# The unary RPCs the lanes carry: the oneof field of each in IoctlRequest/IoctlAnswer.
IOCTL_FIELDS = {
    "DeviceFeature": "device_feature",
    "PrecopyInfo": "precopy_info",
    "CloseFd": "close_fd",
}
# Those a sequence (VfioClient.ioctls) may hold: the ioctls.
SEQUENCE_RPCS = frozenset({"DeviceFeature", "PrecopyInfo"})
# Fields a driver may predate: it answers them EINVAL, operation "ioctl" (a
# request naming nothing it knows), having done nothing; the client then makes
# those calls as unary RPCs.
NEWER_FIELDS = frozenset({"close_fd"})
MAX_LANES = 64  # idle lanes kept, and lanes open at once; beyond them, unary calls

Unary = Callable[[], Any]  # the same call as a unary RPC, awaited for its answer


def ioctl_method(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(
        IOCTL_METHOD,
        request_serializer=pb.IoctlRequest.SerializeToString,
        response_deserializer=pb.IoctlAnswer.FromString,
    )


class _Stale(Exception):
    """The lane's stream had ended before the ioctl was sent on it."""


class _Unsent(Exception):
    """A new lane's first write failed as its stream ended, and grpc lost
    why (see _Lane.ioctls): nothing reached the driver."""


class _Lane:
    """One Ioctl stream, used by one caller at a time."""

    __slots__ = ("answered", "call")

    def __init__(self, call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
        self.call = call
        self.answered = False  # the driver took the stream: it answered on it

    async def ioctls(
        self, requests: Sequence[pb.IoctlRequest]
    ) -> list[pb.IoctlAnswer | VfioClientError]:
        """Every request written, every answer read, in order; _Stale if the
        stream had ended before the first was sent (_Unsent on a new lane
        when grpc hid why).  The answers are read
        while the rest is written: a long sequence of large ioctls must not
        wait on a driver that waits for its answers to be read.  On a new
        lane the rest waits for the first answer: a driver refusing the
        stream (no Ioctl RPC, too many streams) says so before any write
        races its status (see below).  A failure after the first was sent
        fails the ioctls not answered (one before any answer raises); the
        unsent ones fail with ENOTCONN: they never ran.

        The answers read are counted against the requests handed to the
        stream, never against the writes that have returned: grpc completes
        a write and delivers the answer to it as two events, in either order,
        so an answer can be read while the write that sent its request has
        yet to return.  (Reading on "while a write is running" then waited for
        an answer past the last one, for ever: a migration hung in
        pending_exact about once in 2,000 pairs.)"""
        if not requests:
            return []
        if self.call.done():
            raise _Stale
        try:
            await self.call.write(requests[0])
        except asyncio.InvalidStateError:  # ended since: "RPC already finished"
            raise _Stale from None
        except grpc.aio.AioRpcError as e:
            # Ending as it was written: it never went out.  An idle lane's
            # stream ended meanwhile; a new one's was refused (its status,
            # unless grpc's own error for the write hid it: INTERNAL).
            if self.answered:
                raise _Stale from None
            if e.code() == grpc.StatusCode.INTERNAL:
                raise _Unsent from None
            raise
        sent = 1  # writes that returned
        handed = 1  # requests handed to the stream: an answer each, unless it ends
        write_failed = False

        async def write_rest() -> None:
            nonlocal sent, write_failed
            for request in requests[1:]:
                try:
                    await self.call.write(request)
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    write_failed = True
                    return  # the stream ended: the reads below say how
                sent += 1

        writer: asyncio.Future[None] | None = None

        def write_the_rest() -> None:
            nonlocal writer, handed
            # (One ioctl, the common case, needs no writer task.)
            if writer is None and len(requests) > 1:
                handed = len(requests)
                writer = asyncio.ensure_future(write_rest())

        if self.answered:
            write_the_rest()

        async def written() -> None:
            if writer is not None:
                await writer

        unsent = VfioClientError(errno.ENOTCONN, "driver unreachable: the Ioctl stream ended")
        out: list[pb.IoctlAnswer | VfioClientError] = []
        try:
            # A write failing ends the stream, so the read waiting for that
            # request's answer ends too (EOF or the status), below.
            while len(out) < handed:
                try:
                    answer = await self.call.read()
                except grpc.aio.AioRpcError as e:
                    await written()
                    # A write that failed as the stream ended has grpc mark
                    # the call INTERNAL ("Internal error from Core"), hiding
                    # the driver's own status: the stream ended, that is all.
                    # (Only on a lane the driver took: a new one writes
                    # nothing more before the first answer.)
                    lost = write_failed and e.code() == grpc.StatusCode.INTERNAL
                    if not out and not lost:
                        raise
                    out += [unsent if lost else _error(e)] * (sent - len(out))
                    break
                if not isinstance(answer, pb.IoctlAnswer):  # grpc.aio.EOF: the driver ended it
                    await written()
                    ended = VfioClientError(errno.EIO, "the driver ended the Ioctl stream")
                    out += [ended] * (sent - len(out))
                    break
                out.append(answer)
                self.answered = True
                write_the_rest()
            else:
                # Every answer is in; the last write's own completion may
                # still be on its way (cancelling it would cancel the call).
                await written()
        finally:
            if writer is not None:
                writer.cancel()
        # (An answer read counts even where its write then failed: it ran.)
        return out + [unsent] * (len(requests) - len(out))

    def close(self) -> None:
        self.call.cancel()


class IoctlLanes:
    """The Ioctl streams of one client."""

    def __init__(self, channel: grpc.aio.Channel, metadata: grpc.aio.Metadata) -> None:
        self._method = ioctl_method(channel)
        self._metadata = metadata
        self._idle: list[_Lane] = []
        self._open = 0  # lanes that exist: idle or carrying an ioctl
        self.enabled = True  # False: the driver has no Ioctl RPC
        self.unknown: set[str] = set()  # NEWER_FIELDS the driver answered it does not know
        self.closed = False

    def _take(self) -> _Lane:
        return self._idle.pop() if self._idle else self._new_lane()

    def _give_back(self, lane: _Lane, keep: bool) -> None:
        if keep and not self.closed and len(self._idle) < MAX_LANES:
            self._idle.append(lane)
        else:
            self._open -= 1
            lane.close()

    async def call(self, rpc: str, request: Any, unary: Unary) -> Any:
        """The answer message of `rpc` (one of IOCTL_FIELDS) with `request`,
        on a lane when one can be had, else by `unary`; a VfioClientError
        with the RPC's errno when it fails."""
        (result,) = await self.sequence([(rpc, request, unary)])
        if isinstance(result, VfioClientError):
            raise result
        return result

    async def sequence(
        self, items: Sequence[tuple[str, Any, Unary]]
    ) -> list[Any | VfioClientError]:
        """Each (rpc, request, unary) made after the one before it ended, as
        one thread makes them, in one round trip on a lane (else by their
        unary calls, one after another): each one's answer message, or the
        VfioClientError it failed with (a failure does not stop the rest)."""

        async def one_by_one() -> list[Any | VfioClientError]:
            out: list[Any | VfioClientError] = []
            for _, _, unary in items:
                try:
                    out.append(await unary())
                except VfioClientError as e:
                    out.append(e)
            return out

        fields = [IOCTL_FIELDS[rpc] for rpc, _, _ in items]
        if (
            not self.enabled
            or self.closed
            or (not self._idle and self._open >= MAX_LANES)
            or not self.unknown.isdisjoint(fields)
        ):
            return await one_by_one()
        requests = [
            pb.IoctlRequest(**{f: req}) for f, (_, req, _) in zip(fields, items, strict=True)
        ]
        for fresh in (False, True):
            # An idle lane may have ended meanwhile (the driver restarted, the
            # connection broke): nothing was sent on it, so a new lane is asked.
            lane = self._take() if not fresh else self._new_lane()
            keep = False
            try:
                try:
                    answers = await lane.ioctls(requests)
                except _Unsent:
                    return await one_by_one()  # none ran: the unary calls say why
                except _Stale:
                    if fresh:
                        raise VfioClientError(
                            errno.ENOTCONN, "driver unreachable: the Ioctl stream ended"
                        ) from None
                    continue
                except grpc.aio.AioRpcError as e:
                    err = _error(e)
                    if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                        self.enabled = False  # it ran nothing: ask again the old way
                        return await one_by_one()
                    if err.errno == errno.EAGAIN:
                        # The driver's most Ioctl streams per client (several
                        # VfioClients with one client id): these, unary.
                        return await one_by_one()
                    return [err] * len(items)
                keep = all(
                    isinstance(a, pb.IoctlAnswer) and a.WhichOneof("answer") in (f, "error")
                    for a, f in zip(answers, fields, strict=True)
                )
                out: list[Any | VfioClientError] = []
                for (rpc, _, unary), field, a in zip(items, fields, answers, strict=True):
                    if field in NEWER_FIELDS and _not_known(a):
                        # A driver before `field`: it did nothing; the unary call.
                        self.unknown.add(field)
                        try:
                            out.append(await unary())
                        except VfioClientError as e:
                            out.append(e)
                        continue
                    out.append(_answer(rpc, field, a))
                return out
            finally:
                self._give_back(lane, keep)
        raise AssertionError("unreachable")  # pragma: no cover

    def _new_lane(self) -> _Lane:
        self._open += 1
        return _Lane(self._method(metadata=self._metadata))

    def close(self) -> None:
        """Cancel every idle lane; one in use is cancelled by its caller."""
        self.closed = True
        idle, self._idle = self._idle, []
        for lane in idle:
            with contextlib.suppress(Exception):
                lane.close()
        self._open -= len(idle)


def _not_known(a: pb.IoctlAnswer | VfioClientError) -> bool:
    """The answer of a driver that found no call it knows in the request."""
    return (
        isinstance(a, pb.IoctlAnswer)
        and a.WhichOneof("answer") == "error"
        and a.error.errno == errno.EINVAL
        and a.error.operation == "ioctl"
    )


def _answer(rpc: str, field: str, a: pb.IoctlAnswer | VfioClientError) -> Any:
    """An IoctlAnswer's message for `field`, or the VfioClientError it carries."""
    if isinstance(a, VfioClientError):
        return a
    which = a.WhichOneof("answer")
    if which == field:
        return getattr(a, field)
    if which == "error":
        return VfioClientError(a.error.errno, a.error.message)
    return VfioClientError(errno.EIO, f"the driver answered {rpc} with {which or 'nothing'}")

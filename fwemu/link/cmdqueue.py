"""The driver's side of the firmware's CommandQueue stream (firmware.proto),
as mlx5's command interface: commands posted on one long-lived stream, at
most QUEUE_SLOTS in flight (a command waits for a slot, as mlx5_cmd_exec
waits on the command semaphore), each answer matched to its command by token.

Commands posted while the last batch has had no answer yet go together in the
next one (as Nagle's rule does for small segments: a lone command goes at
once; a batch waits at most HOLD_S, so a command the firmware delays does not
hold the others back).

A slot is held from posting until the answer arrives (the firmware frees its
own before it sends the answer, so the driver never overfills the firmware's
queue), or until the stream breaks: then every command in flight fails at
once with the stream's error (a LinkError), and the next command opens a new
stream.  A firmware without CommandQueue (UNIMPLEMENTED) ran none of the
commands sent: they fail with `Unqueued`, for the link to send them as unary
RPCs, and `unimplemented` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from grpcsvc.errors import error_info

from ..api.v1 import firmware_pb2 as fpb
from .base import LinkError
from .ifc import Command
from .wire import QUEUE_SLOTS, queued_to_pb

# The longest a batch waits for an answer to the one before it (a command
# the firmware delays, by an injected fault, answers late).
HOLD_S = 0.001

# Opens the stream: (the request stream) -> the call (grpc.aio's, or an interceptor's).
Open = Callable[[AsyncIterator[fpb.CommandQueueRequest]], Any]


class RpcFailed(LinkError):
    """A call, or the command queue stream, failed with a gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class Unqueued(Exception):
    """The firmware has no CommandQueue: the command was not run."""


def rpc_failed(e: grpc.aio.AioRpcError) -> RpcFailed:
    """A failed call as the link reports it: its ErrorInfo's message."""
    info = error_info(e)
    return RpcFailed(info.message or f"{e.code().name}: {e.details()}", e.code())


@dataclass(eq=False)
class _Stream:
    """One CommandQueue call and what is in flight on it."""

    outbox: list[fpb.QueuedCommand] = field(default_factory=list)  # posted, not yet written
    pending: dict[int, asyncio.Future[fpb.CommandAnswer]] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    reader: asyncio.Task[None] | None = None
    held: bool = False  # a batch went and no answer came since
    timer: asyncio.TimerHandle | None = None

    async def requests(self) -> AsyncIterator[fpb.CommandQueueRequest]:
        """The batches.  While a batch has had no answer yet, what is posted
        waits for one (at most HOLD_S), so that commands posted meanwhile go
        together: fewer messages for both sides to handle when many are in
        flight, and no wait at all when one is."""
        while not self.closed:
            if not self.outbox or self.held:
                self.wake.clear()
                await self.wake.wait()
                continue
            batch, self.outbox = self.outbox, []
            self.held = True
            self.timer = asyncio.get_running_loop().call_later(HOLD_S, self.release)
            yield fpb.CommandQueueRequest(commands=batch)

    def release(self) -> None:
        """An answer came (or HOLD_S passed): what is posted may go."""
        self.held = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.outbox:
            self.wake.set()


class CommandQueue:
    """The link's command queue; `run` sends one command and waits for its answer."""

    def __init__(self, open_stream: Open, token_base: int, slots: int = QUEUE_SLOTS) -> None:
        self._open = open_stream
        self._token_base = token_base
        self._tokens = itertools.count(1)
        self._slots = asyncio.Semaphore(slots)
        self._stream: _Stream | None = None
        self.unimplemented = False  # the firmware answered UNIMPLEMENTED
        self.streams_opened = 0

    @property
    def in_flight(self) -> int:
        """Commands posted whose answers have not arrived (each holds a slot)."""
        return len(self._stream.pending) if self._stream is not None else 0

    async def run(self, cmd: Command[Any]) -> fpb.CommandAnswer:
        """Post `cmd`, once a slot is free, and wait for its answer; RpcFailed
        if the stream breaks first, Unqueued if the firmware has no queue."""
        token = self._token_base | next(self._tokens)
        queued = queued_to_pb(token, cmd)
        answer: asyncio.Future[fpb.CommandAnswer] = asyncio.get_running_loop().create_future()
        await self._slots.acquire()
        try:
            if self.unimplemented:  # learnt while this command waited for its slot
                raise Unqueued("the firmware has no command queue")
            stream = self._stream if self._stream is not None else self._start()
        except BaseException:
            self._slots.release()
            raise
        stream.pending[token] = answer
        stream.outbox.append(queued)
        stream.wake.set()
        try:
            return await answer
        except asyncio.CancelledError:
            # Not written yet: withdrawn (once written, its answer frees the slot).
            if any(q is queued for q in stream.outbox):
                stream.outbox = [q for q in stream.outbox if q is not queued]
                self._settle(stream, token)
            raise

    def _settle(self, stream: _Stream, token: int) -> asyncio.Future[fpb.CommandAnswer] | None:
        """The command of `token` leaves the queue: its slot is free again."""
        answer = stream.pending.pop(token, None)
        if answer is not None:
            self._slots.release()
        return answer

    def _start(self) -> _Stream:
        stream = self._stream = _Stream()
        call = self._open(stream.requests())
        self.streams_opened += 1
        stream.reader = asyncio.ensure_future(self._read(stream, call))
        return stream

    async def _read(self, stream: _Stream, call: Any) -> None:
        failure: BaseException = RpcFailed(
            "the firmware ended the command queue", grpc.StatusCode.UNAVAILABLE
        )
        try:
            async for response in call:
                stream.release()
                for a in response.answers:
                    answer = self._settle(stream, a.token)
                    if answer is not None and not answer.done():
                        answer.set_result(a)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.unimplemented = True
                failure = Unqueued(e.details())
            else:
                failure = rpc_failed(e)
        except asyncio.CancelledError:
            failure = RpcFailed("firmware link closed", grpc.StatusCode.CANCELLED)
            call.cancel()
            raise
        finally:
            self._end(stream, failure)

    def _end(self, stream: _Stream, failure: BaseException) -> None:
        """Every command in flight on `stream` fails with `failure`, at once."""
        stream.closed = True
        stream.release()
        stream.outbox.clear()
        stream.wake.set()
        if self._stream is stream:
            self._stream = None
        for token in list(stream.pending):
            answer = self._settle(stream, token)
            if answer is not None and not answer.done():
                answer.set_exception(failure)
                answer.exception()  # retrieved: a caller that went away logs nothing

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and stream.reader is not None:
            stream.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader

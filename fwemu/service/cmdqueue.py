"""The Firmware service's CommandQueue stream: mlx5's command queue over gRPC.

A driver posts batches of commands on one long-lived stream, each with a token
of its own; every command goes through the servicer's one command path (the
same as its unary RPC: faults, counters, the error mapping of
fwemu.service.failures) and its answer goes back with that token as soon as
it is ready, several per message when several are.  A command whose answer is
delayed (an injected DELAY fault) waits in a task of its own, so the others
keep answering, as several VFs' commands do on the unary RPCs.

Bounds (firmware.proto, CommandQueue): at most QUEUE_SLOTS commands in flight,
from the time a command is read until its answer is handed to the stream; a
command beyond them is refused (QUEUE_FULL), as is a token already in flight
(DUPLICATE_TOKEN) and a command none of whose fields this firmware knows
(UNKNOWN_COMMAND); a batch larger than the queue ends the stream
(BATCH_TOO_LARGE).  A client that does not read its answers is not read from
either once QUEUE_SLOTS answers wait for it, so what one stream holds stays
bounded whatever its client does; streams share nothing but the model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..api.v1 import firmware_pb2 as fpb
from ..link.ifc import CmdResult, Command
from ..link.wire import QUEUE_SLOTS, QUEUED, answer_to_pb
from .failures import DOMAIN

# Runs one command's request message through the command path: its outbox.
Execute = Callable[[type[Command[Any]], Any], CmdResult]


@dataclass(frozen=True, slots=True)
class QueueViolation:
    """Why a stream was ended: the status it ends with."""

    code: grpc.StatusCode
    message: str
    reason: str


def refused(token: int, code: grpc.StatusCode, message: str, reason: str) -> fpb.CommandAnswer:
    """The answer to a command refused as a whole (it never ran)."""
    return fpb.CommandAnswer(
        token=token,
        refused=fpb.RefusedCommand(
            code=code.value[0], message=message, reason=reason, domain=DOMAIN
        ),
    )


class CommandQueueStream:
    """One CommandQueue stream, for one caller: read batches, run their
    commands, hand their answers out as they are ready."""

    def __init__(
        self,
        execute: Execute,
        sleep: Callable[[float], Awaitable[None]],
        stopping: asyncio.Event,
        slots: int = QUEUE_SLOTS,
    ) -> None:
        self._execute = execute
        self._sleep = sleep
        self._stopping = stopping
        self.slots = slots
        self._in_flight: set[int] = set()  # tokens read whose answers were not handed out
        # Answers ready to go, each with whether handing it out frees its token's slot
        # (a refusal frees none: a refused duplicate's token is the one in flight's).
        self._ready: list[tuple[fpb.CommandAnswer, bool]] = []
        self._wake = asyncio.Event()  # an answer is ready, or reading ended
        self._room = asyncio.Event()  # fewer than `slots` answers wait to go
        self._room.set()
        self._delayed: set[asyncio.Task[None]] = set()
        self.violation: QueueViolation | None = None

    async def answers(
        self, requests: AsyncIterable[fpb.CommandQueueRequest]
    ) -> AsyncIterator[fpb.CommandQueueResponse]:
        """The answers, batched, until the client half-closes and every
        command is answered, the server stops, or the client breaks a bound
        that ends the stream (then `violation` says which)."""
        reader = asyncio.ensure_future(self._read(requests))
        stopping = asyncio.ensure_future(self._stopping.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        try:
            while True:
                if self._ready:
                    batch, self._ready = self._ready, []
                    self._room.set()
                    for answer, frees in batch:
                        if frees:
                            self._in_flight.discard(answer.token)
                    yield fpb.CommandQueueResponse(answers=[a for a, _ in batch])
                    continue
                if self.violation is not None or stopping.done():
                    return
                if reader.done() and not self._in_flight:
                    reader.result()  # the request stream's own error, if any
                    return
                self._wake.clear()
                await self._wake.wait()
        finally:
            stopping.cancel()
            reader.cancel()
            for task in self._delayed:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, requests: AsyncIterable[fpb.CommandQueueRequest]) -> None:
        try:
            async for request in requests:
                if len(request.commands) > self.slots:
                    self.violation = QueueViolation(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"a CommandQueue batch carries at most {self.slots} commands "
                        f"(the queue's slots), not {len(request.commands)}",
                        "BATCH_TOO_LARGE",
                    )
                    return
                for queued in request.commands:
                    self._post(queued)
                self._wake.set()
                if len(self._ready) >= self.slots:  # a client that does not read its answers
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._wake.set()

    def _post(self, queued: fpb.QueuedCommand) -> None:
        """Run one command, or refuse it; its answer is ready at once unless delayed."""
        token = queued.token
        field = queued.WhichOneof("command")
        if field is None:
            self._refuse(
                token,
                grpc.StatusCode.UNIMPLEMENTED,
                "the command names no command this firmware knows",
                "UNKNOWN_COMMAND",
            )
        elif token in self._in_flight:
            self._refuse(
                token,
                grpc.StatusCode.ALREADY_EXISTS,
                f"token {token} is in flight on this queue",
                "DUPLICATE_TOKEN",
            )
        elif len(self._in_flight) >= self.slots:
            self._refuse(
                token,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the command queue is full ({self.slots} commands in flight)",
                "QUEUE_FULL",
            )
        else:
            self._in_flight.add(token)
            cls = QUEUED[field]
            r = self._execute(cls, getattr(queued, field))
            if r.delay_s > 0:  # an injected DELAY: answer later, the others meanwhile
                task = asyncio.ensure_future(self._answer_later(token, cls, r))
                self._delayed.add(task)
                task.add_done_callback(self._delayed.discard)
            else:
                self._ready.append((answer_to_pb(token, cls, r), True))

    def _refuse(self, token: int, code: grpc.StatusCode, message: str, reason: str) -> None:
        self._ready.append((refused(token, code, message, reason), False))

    async def _answer_later(self, token: int, cls: type[Command[Any]], r: CmdResult) -> None:
        await self._sleep(r.delay_s)
        self._ready.append((answer_to_pb(token, cls, r), True))
        self._wake.set()

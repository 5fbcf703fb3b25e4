"""The calls on fds that the servicer's RPCs share: read(2) and write(2)
through the caller's mapped memory, the direction check of a data fd, a
file's stream, the user memory of a feature ioctl."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

from ..api.v1 import vfio_pb2 as pb
from ..mlx5.migf import Mlx5VfMigrationFile
from ..mlx5.save import SaveFile
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile
from ..vfio.usermem import UserMemory
from .errnos import UNEXPECTED, as_vfio_error
from .process import DataFd, Process

MAX_READ = 16 << 20  # one message; read(2) may return less than asked anyway
MAX_WRITE = MAX_READ  # one WriteFrom; write(2) may take less (the count says)
MAX_THEN = 63  # a ReadIntoStream / WriteFromStream request's spans: 64 operations at most
NOT_DONE = "not %s: an earlier request of this stream failed"

StreamReq = TypeVar("StreamReq", pb.ReadIntoRequest, pb.WriteFromRequest)
StreamResp = TypeVar("StreamResp", pb.ReadIntoResponse, pb.WriteFromResponse)
# Counts, publishes and logs an errno answer (VfioServicer._errno_answered): the errno.
ErrnoAnswered = Callable[..., int]


async def read_into(proc: Process, req: pb.ReadIntoRequest) -> int:
    """read(2) into the caller's mapped memory."""
    file = data_fd_file(proc, req.fd, saving=True)
    with proc.memory.range(req.addr, min(req.count, MAX_READ)) as dest:
        return await file.readinto(dest, nonblock=req.nonblock)


async def write_from(proc: Process, req: pb.WriteFromRequest) -> int:
    """write(2) from the caller's mapped memory."""
    file = data_fd_file(proc, req.fd, saving=False)
    with proc.memory.range(req.addr, min(req.count, MAX_WRITE)) as src:
        return await file.write(src.view)


def data_fd_file(proc: Process, fd: int, *, saving: bool) -> MigrationFile:
    """The data fd's file for read(2) (`saving`) or write(2): vfs_read/vfs_write
    refuse the wrong direction (EBADF) before the user range is looked at."""
    file = proc.data(fd)
    entry = proc.get(fd)
    if isinstance(entry, DataFd) and entry.saving != saving:
        which = "write-only (resuming)" if saving else "read-only (saving)"
        raise VfioError(errno.EBADF, f"fd {fd} is {which}")
    return file


def stream_of(file: MigrationFile) -> tuple[int, bool]:
    """An mlx5vf file's stream number and side (saving?)."""
    if isinstance(file, Mlx5VfMigrationFile):
        return file.stream_id, isinstance(file, SaveFile)
    return 0, True


def user_memory(buffers: Iterable[pb.UserBuffer]) -> UserMemory:
    """The caller's address space; buffers that overlap (or share an address)
    describe none, so their addresses are bad: EFAULT."""
    mem: dict[int, bytearray] = {}
    for b in buffers:
        if b.addr in mem:
            raise VfioError(errno.EFAULT, f"two user buffers at {b.addr:#x}")
        mem[b.addr] = bytearray(b.data)
    try:
        return UserMemory(mem)
    except ValueError as e:
        raise VfioError(errno.EFAULT, f"user memory: {e}") from None


def no_then(req: pb.ReadIntoRequest | pb.WriteFromRequest, rpc: str) -> None:
    """The unary calls make one read(2) or write(2): `then` is EINVAL."""
    if req.then:
        raise VfioError(errno.EINVAL, f"{rpc} makes one call: `then` is for {rpc}Stream")


def stream_ops(req: StreamReq) -> list[StreamReq]:
    """A stream request's operations: itself, then one per `then` span."""
    if not req.then:
        return [req]
    ops = [req]
    for span in req.then:
        if isinstance(req, pb.ReadIntoRequest):
            ops.append(
                pb.ReadIntoRequest(
                    fd=req.fd, addr=span.addr, count=span.count, nonblock=req.nonblock
                )
            )
        else:
            ops.append(pb.WriteFromRequest(fd=req.fd, addr=span.addr, count=span.count))
    return ops


class StreamCalls(Generic[StreamReq, StreamResp]):
    """The stream form of ReadInto / WriteFrom, one call's: one answer per
    request, an errno in the answer (no abort); after a failure the rest are
    not done (ECANCELED); after a read returned 0 (the end of the data) the
    rest are answered 0 without a read.  A request's `then` spans are more
    of the same, after it and in order, answered in its answer's `then`: one
    message each way for several read(2)s or write(2)s (MAX_THEN + 1 at
    most: more are EINVAL, none done)."""

    def __init__(
        self,
        operation: str,  # "read" | "write"
        call: Callable[[Process, StreamReq], Awaitable[int]],
        response: Callable[..., StreamResp],
        answered: ErrnoAnswered,
    ) -> None:
        self.operation = operation
        self.call: Callable[[Process, StreamReq], Awaitable[int]] = call
        self.response: Callable[..., StreamResp] = response
        self.answered = answered
        self.ended = False
        self.failed = False

    async def answer(self, proc: Process, req: StreamReq) -> StreamResp:
        response, operation = self.response, self.operation
        if len(req.then) > MAX_THEN:
            answer: StreamResp = response(
                errno=errno.EINVAL,
                message=f"{len(req.then) + 1} {operation}s in one request: at most {MAX_THEN + 1}",
            )
            if not self.failed:
                self.answered(
                    VfioError(errno.EINVAL, answer.message), operation, proc=proc, fd=req.fd
                )
            self.failed = True
            return answer
        answers: list[StreamResp] = []
        for op in stream_ops(req):
            if self.ended:
                answers.append(response(count=0))
                continue
            if self.failed:
                done = "read" if operation == "read" else "written"
                answers.append(response(errno=errno.ECANCELED, message=NOT_DONE % done))
                continue
            try:
                n = await self.call(proc, op)
            except UNEXPECTED as exc:
                self.failed = True
                e = as_vfio_error(exc)
                code = self.answered(e, operation, proc=proc, fd=op.fd)
                answers.append(response(errno=code, message=str(e)))
                continue
            self.ended = operation == "read" and n == 0 and min(op.count, MAX_READ) > 0
            answers.append(response(count=n))
        first = answers[0]
        if len(answers) > 1:
            first.then.extend(answers[1:])
        return first

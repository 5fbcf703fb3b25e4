"""Migration data streams of the mlx5vf tests: the records of a saving stream
(struct mlx5_vf_migration_header) and reading / writing whole streams through
the data files."""

from __future__ import annotations

import asyncio
import errno
import itertools
import struct
import time
from dataclasses import dataclass
from typing import Any

from driver.vfio.errors import VfioError
from driver.vfio.uapi import PRECOPY_INFO, VFIO_MIG_GET_PRECOPY_INFO
from tests.support.mlx5.devices import WAIT_S, Dev, Mlx5Env, S

# Stream records (struct mlx5_vf_migration_header): le64 size, le32 flags, le32 tag
REC_HEADER = struct.Struct("<QII")
TAG_FW_DATA = 0
TAG_STOP_COPY_SIZE = 1
FLAG_OPTIONAL = 1
STOP_COPY_SIZE_RECORD = 24  # header {8, OPTIONAL, 1} + le64
IMAGE_HEADER = 52  # the emulated firmware's image header, before its payload


@dataclass(frozen=True)
class Record:
    size: int
    flags: int
    tag: int
    payload: bytes
    offset: int  # of the record header in the stream


def parse_stream(stream: bytes) -> list[Record]:
    """Split a saving stream into records; the stream must end on a record."""
    out = []
    pos = 0
    while pos < len(stream):
        assert pos + REC_HEADER.size <= len(stream), f"torn record header at {pos}"
        size, flags, tag = REC_HEADER.unpack_from(stream, pos)
        end = pos + REC_HEADER.size + size
        assert end <= len(stream), f"record at {pos} of {size} bytes runs past the stream"
        out.append(Record(size, flags, tag, bytes(stream[pos + REC_HEADER.size : end]), pos))
        pos = end
    return out


def record(payload: bytes, *, tag: int = TAG_FW_DATA, flags: int = 0) -> bytes:
    return REC_HEADER.pack(len(payload), flags, tag) + payload


async def read_available(file: Any, count: int = 1 << 20) -> bytes:
    """Non-blocking reads until the temporary end of a PRE_COPY stream (ENOMSG)."""
    out = bytearray()
    while True:
        try:
            chunk = await file.read(count, nonblock=True)
        except VfioError as e:
            if e.errno == errno.ENOMSG:
                return bytes(out)
            raise
        assert chunk, "b'' in PRE_COPY"
        out += chunk


async def precopy_with_dirt(env: Mlx5Env, dev: Dev, seconds: float = 0.02) -> Any:
    """RUNNING -> PRE_COPY, its initial data read, then `seconds` of the VF's
    workload (a virtual clock moved): the saving file, with dirt to report."""
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await read_available(f)
    await env.advance(seconds)
    return f


async def read_to_eof(env: Mlx5Env, file: Any, count: int = 1 << 20) -> bytes:
    """Read a STOP_COPY stream to its end (b''), moving a virtual clock when
    the data is not there yet (EAGAIN)."""
    out = bytearray()
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            chunk = await file.read(count, nonblock=True)
        except VfioError as e:
            if e.errno != errno.EAGAIN:
                raise
            assert time.monotonic() < deadline, "stop-copy data never came"
            await env.advance(0)
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            return bytes(out)
        out += chunk


async def write_all(file: Any, stream: bytes, cuts: list[int] | None = None) -> None:
    """Write `stream` in the pieces `cuts` makes (offsets), each fully taken."""
    bounds = [0, *sorted(set(c for c in cuts or [] if 0 < c < len(stream))), len(stream)]
    for a, b in itertools.pairwise(bounds):
        assert await file.write(stream[a:b]) == b - a


async def migrate_stopped(env: Mlx5Env, src: Dev) -> bytes:
    """RUNNING -> STOP -> STOP_COPY, read to EOF, -> STOP: the whole stream."""
    await src.set_state(S.STOP)
    f = await src.set_state(S.STOP_COPY)
    stream = await read_to_eof(env, f)
    await src.set_state(S.STOP)
    return stream


async def load_stream(dst: Dev, stream: bytes, cuts: list[int] | None = None) -> None:
    """RUNNING -> STOP -> RESUMING, write, -> STOP."""
    await dst.set_state(S.STOP)
    f = await dst.set_state(S.RESUMING)
    await write_all(f, stream, cuts)
    await dst.set_state(S.STOP)


async def pre_copy_stream(env: Mlx5Env, src: Dev, rounds: int = 2) -> tuple[bytes, str]:
    """A whole migration stream of `src` (which should have a workload):
    PRE_COPY with `rounds` incremental images, then PRE_COPY_P2P, STOP_COPY,
    read to EOF, STOP.  Returns (stream, the stopped source's digest)."""
    f = await src.set_state(S.PRE_COPY)
    await env.settle(src)
    stream = bytearray(await read_available(f))
    for _ in range(rounds):
        await (env.advance(0.02) if env.virtual else asyncio.sleep(0.02))
        await env.drive(f.ioctl(VFIO_MIG_GET_PRECOPY_INFO, PRECOPY_INFO.pack(24, 0, 0, 0)))
        await env.settle(src)
        stream += await read_available(f)
    await (env.advance(0.02) if env.virtual else asyncio.sleep(0.02))  # dirt for the final image
    await src.set_state(S.PRE_COPY_P2P)
    await src.set_state(S.STOP_COPY)
    stream += await read_to_eof(env, f)
    await src.set_state(S.STOP)
    return bytes(stream), await src.digest()

"""read(2) on the mlx5 data files (reference §4, patch 5/6 "consider inflight
SAVE during PRE_COPY"): the temporary end of a PRE_COPY stream (ENOMSG), the
wait for a SAVE in flight, the permanent end of a STOP_COPY stream (b""), EAGAIN,
ENODEV, EBADF and ENOTTY."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.api.wire import ReadAnswer, encode_read_response
from driver.mlx5.cmd import MigfState
from driver.vfio.errors import VfioError
from driver.vfio.uapi import PRECOPY_INFO, VFIO_DEVICE_FEATURE, VFIO_MIG_GET_PRECOPY_INFO, MigState
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, Opcode
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)


async def pending(task: asyncio.Future[Any], for_s: float = 0.1) -> bool:
    """Whether `task` is still waiting after `for_s` seconds of real time."""
    await asyncio.sleep(for_s)
    return not task.done()


async def dirty_save_in_flight(env: h.Mlx5Env, dev: h.Dev, f: Any) -> int:
    """All queued data read, pages dirtied, GET_PRECOPY_INFO issued the
    incremental SAVE; returns its dirty_bytes (inc_length + 16)."""
    await h.read_available(f)
    await env.advance(0.02)
    info = await h.precopy_info(f)
    assert info.dirty_bytes > 16
    return info.dirty_bytes


async def test_reads_are_sequential_and_span_queued_buffers(mlx5: h.Factory) -> None:
    """§4: data comes from the head of the queue in stream order; one read may
    span several queued buffers (the size record, the FW_DATA header, the
    image) and stops short when the queue empties."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(64 * 1024))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    info = await h.precopy_info(f)
    whole = await f.read(1 << 20)
    assert len(whole) == info.initial_bytes  # short read: all that was queued
    recs = h.parse_stream(whole)
    assert [r.offset for r in recs] == [0, h.STOP_COPY_SIZE_RECORD]
    assert dev.saving_migf.f_pos == len(whole)


async def test_a_read_into_a_read_answer_answers_the_bytes_read(mlx5: h.Factory) -> None:
    """What Read and ReadStream answer: a read(2) straight into the gRPC
    answer (wire.ReadAnswer), here one that spans the size record, the FW_DATA
    header and the image, is the ReadResponse of the stream's bytes."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(64 * 1024))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    info = await h.precopy_info(f)
    answer = ReadAnswer(1 << 20)
    assert await f.readinto(answer) == answer.size == info.initial_bytes
    whole = pb.ReadResponse.FromString(encode_read_response(answer.chunk())).data
    recs = h.parse_stream(whole)
    assert [r.offset for r in recs] == [0, h.STOP_COPY_SIZE_RECORD]
    assert dev.saving_migf.f_pos == len(whole)


async def test_small_reads_give_the_same_stream_as_one_big_read(mlx5: h.Factory) -> None:
    """§4: the stream is a byte sequence: however it is read, the bytes are the
    same and in order (two identical firmwares, two read patterns)."""
    streams = []
    for step in (1 << 20, 7):
        env = await mlx5("virtual", seed=5)
        dev = await env.device(h.vf_config(48 * 1024, seed=77))
        await dev.set_state(S.STOP)
        f = await dev.set_state(S.STOP_COPY)
        stream = await h.read_to_eof(env, f, count=step)
        streams.append(stream)
    a, b = (h.parse_stream(s) for s in streams)
    assert [(r.size, r.flags, r.tag) for r in a] == [(r.size, r.flags, r.tag) for r in b]
    # The images differ only in their chain id (unique per firmware instance).
    assert a[1].payload[52:] == b[1].payload[52:]


async def test_read_of_zero_bytes_returns_nothing(mlx5: h.Factory) -> None:
    """mlx5vf_save_read's loop runs while len: read(0) returns 0 even at the
    temporary end of a PRE_COPY stream."""
    env = await mlx5("virtual")
    dev = await env.device()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await h.read_available(f)
    assert await f.read(0) == b""
    assert await f.read(0, nonblock=True) == b""


@pytest.mark.parametrize("nonblock", [False, True], ids=["blocking", "nonblock"])
async def test_enomsg_at_the_temporary_end_of_a_pre_copy_stream(
    mlx5: h.Factory, nonblock: bool
) -> None:
    """§4: in PRE_COPY with initial and dirty both 0 read() fails with ENOMSG
    (blocking or not: no SAVE in flight, so a blocking read does not wait)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=0))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await h.read_available(f)
    info = await h.precopy_info(f)
    assert (info.initial_bytes, info.dirty_bytes) == (0, 0)
    for _ in range(2):
        with h.raises_errno(errno.ENOMSG):
            await asyncio.wait_for(f.read(4096, nonblock=nonblock), 2)


async def test_blocking_read_waits_for_the_save_in_flight_virtual_clock(mlx5: h.Factory) -> None:
    """Patch 5/6: a blocking read with nothing queued waits while a SAVE is in
    flight in PRE_COPY (instead of ENOMSG) and returns its record once it
    completes; a non-blocking read meanwhile gets ENOMSG (§4 note)."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    dirty = await dirty_save_in_flight(env, dev, f)
    assert dev.saving_migf.inflight_save
    reader = asyncio.ensure_future(f.read(1 << 20))
    assert await pending(reader)
    with h.raises_errno(errno.ENOMSG):
        await f.read(1 << 20, nonblock=True)
    assert not reader.done()
    await env.advance(0)
    got = await asyncio.wait_for(reader, 5)
    assert len(got) == dirty


async def test_blocking_read_waits_for_a_delayed_completion_real_clock(mlx5: h.Factory) -> None:
    """Patch 5/6 with a DELAY_COMPLETION fault on the real clock: the blocking
    read stays pending for the delay, a non-blocking read gets ENOMSG, then
    the read returns the new record."""
    env = await mlx5()
    dev = await env.device(h.vf_config(dirty=4 << 20))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await h.read_available(f)
    await asyncio.sleep(0.02)  # the workload dirties pages
    await env.inject(dev, Fault(FaultKind.DELAY_COMPLETION, delay_s=0.4))
    mark = dev.mark()
    info = await h.precopy_info(f)
    assert info.dirty_bytes > 16
    [save] = [c for c in dev.cmds(mark) if c.name == "SAVE"]
    reader = asyncio.ensure_future(f.read(1 << 20))
    assert await pending(reader, 0.15)
    assert save.completion is None
    with h.raises_errno(errno.ENOMSG):
        await f.read(1 << 20, nonblock=True)
    got = await asyncio.wait_for(reader, 5)
    # (On the real clock the SAVE may take a little more than the query said:
    # the device ran in between.)
    assert save.completion is not None and save.completion.status == 0
    assert len(got) == 16 + save.completion.actual_image_size


async def test_before_the_first_save_completes_nonblocking_read_gets_eagain(
    mlx5: h.Factory,
) -> None:
    """§4 / §5.5: until the first tracked SAVE completed, the saving file's
    state is 0 (not yet PRE_COPY): past the 24-byte size record a non-blocking
    read gets EAGAIN (not ENOMSG) and a blocking read waits for the image."""
    env = await mlx5("virtual")
    dev = await env.device()
    f = await dev.set_state(S.PRE_COPY, drive=False)
    assert len(await f.read(1 << 20, nonblock=True)) == h.STOP_COPY_SIZE_RECORD
    with h.raises_errno(errno.EAGAIN):
        await f.read(1, nonblock=True)
    reader = asyncio.ensure_future(f.read(1 << 20))
    assert await pending(reader)
    await env.advance(0)
    got = await asyncio.wait_for(reader, 5)
    assert h.parse_stream(got)[0].payload[:4] == b"VHCA"


async def test_stop_copy_end_of_stream_is_eof_never_enomsg(mlx5: h.Factory) -> None:
    """§4: in STOP_COPY the end of the stream is permanent: read() returns b""
    (blocking or not, again and again), never ENOMSG."""
    env = await mlx5()
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.walk(S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY)
    stream = await h.read_to_eof(env, f)
    assert len(stream) > 64 * 1024
    for nonblock in (False, True, False):
        assert await asyncio.wait_for(f.read(4096, nonblock=nonblock), 2) == b""


async def test_eagain_while_stop_copy_data_is_not_there_yet(mlx5: h.Factory) -> None:
    """§4: in STOP_COPY with the final SAVE still in flight, a non-blocking read
    at the end of the queued data gets EAGAIN and a blocking read waits; once
    the SAVE completed the data follows, then b""."""
    env = await mlx5("virtual")
    dev = await env.device()
    await dev.set_state(S.STOP)
    f = await dev.set_state(S.STOP_COPY, drive=False)
    assert len(await f.read(1 << 20, nonblock=True)) == h.STOP_COPY_SIZE_RECORD
    for _ in range(2):
        with h.raises_errno(errno.EAGAIN):
            await f.read(1 << 20, nonblock=True)
    reader = asyncio.ensure_future(f.read(1 << 20))
    assert await pending(reader)
    await env.advance(0)
    got = await asyncio.wait_for(reader, 5)
    assert h.parse_stream(got)[0].payload[:4] == b"VHCA"
    assert await f.read(10) == b""


async def test_eagain_after_pre_copy_p2p_to_stop_copy_until_the_final_image(
    mlx5: h.Factory,
) -> None:
    """§4: once in STOP_COPY, the end of the pre-copy data is not a temporary
    end any more: EAGAIN (non-blocking) until the final image is queued."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(dirty=1 << 20))
    f = await dev.walk(S.PRE_COPY, S.PRE_COPY_P2P)
    await env.advance(0.02)
    await dev.set_state(S.STOP_COPY, drive=False)
    await read_available_or_eagain(f)
    with h.raises_errno(errno.EAGAIN):
        await f.read(1, nonblock=True)
    await env.advance(0)
    tail = await h.read_to_eof(env, f)
    assert h.parse_stream(tail)[0].payload[:4] == b"VHCA"


async def read_available_or_eagain(f: Any) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await f.read(1 << 20, nonblock=True)
        except Exception as e:
            assert getattr(e, "errno", None) == errno.EAGAIN, e
            return bytes(out)


async def test_enodev_after_the_saving_file_went_to_error(mlx5: h.Factory) -> None:
    """§5.10: a saving file in ERROR (here: the stop-copy SAVE completed with
    INT_ERR) fails every read with ENODEV, even with the 24-byte size record
    still queued, blocking or not."""
    env = await mlx5()
    dev = await env.device()
    await dev.set_state(S.STOP)
    await env.inject(
        dev,
        Fault(FaultKind.FAIL, Opcode.SAVE_VHCA_STATE, CmdStatus.INT_ERR, in_completion=True),
    )
    f = await dev.set_state(S.STOP_COPY)
    await env.settle(dev)
    assert dev.saving_migf.state == MigfState.ERROR
    assert dev.saving_migf.buf_list  # the size record is still queued
    for nonblock in (True, False):
        with h.raises_errno(errno.ENODEV):
            await asyncio.wait_for(f.read(10, nonblock=nonblock), 2)


async def test_ebadf_reading_the_resuming_file_and_writing_the_saving_file(
    mlx5: h.Factory,
) -> None:
    """The resuming file is write-only and the saving file read-only (anon
    inodes opened O_WRONLY / O_RDONLY): EBADF."""
    env = await mlx5()
    src, dst = await env.devices(2)
    sf = await src.set_state(S.PRE_COPY)
    rf = await dst.walk(S.STOP, S.RESUMING)
    with h.raises_errno(errno.EBADF):
        await rf.read(1)
    with h.raises_errno(errno.EBADF):
        await rf.read(1, nonblock=True)
    with h.raises_errno(errno.EBADF):
        await sf.write(b"\0" * 16)
    # Neither file was disturbed.
    assert len(await h.read_available(sf)) > 24
    assert await rf.write(b"") == 0


async def test_enotty_for_other_ioctls_on_the_data_files(mlx5: h.Factory) -> None:
    """§3.1: another cmd on the saving fd -> ENOTTY; the resuming fd has no
    unlocked_ioctl at all, so even VFIO_MIG_GET_PRECOPY_INFO is ENOTTY."""
    env = await mlx5()
    src, dst = await env.devices(2)
    sf = await src.set_state(S.PRE_COPY)
    rf = await dst.walk(S.STOP, S.RESUMING)
    arg = PRECOPY_INFO.pack(24, 0, 0, 0)
    for cmd in (VFIO_DEVICE_FEATURE, 0x5401, VFIO_MIG_GET_PRECOPY_INFO - 1):
        with h.raises_errno(errno.ENOTTY):
            await sf.ioctl(cmd, arg)
    for cmd in (VFIO_MIG_GET_PRECOPY_INFO, VFIO_DEVICE_FEATURE):
        with h.raises_errno(errno.ENOTTY):
            await rf.ioctl(cmd, arg)


async def test_release_while_in_pre_copy_keeps_the_device_session(mlx5: h.Factory) -> None:
    """The driver holds its own reference to the saving file (get_file): the
    user's close does not end the session; the arc out of PRE_COPY still
    sends the cleanup and ends it; the Any then reads ENODEV, no hang."""
    env = await mlx5()
    dev = await env.device()
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    await f.release()
    assert dev.mvdev.saving_migf is f
    mark = dev.mark()
    await dev.set_state(S.RUNNING)
    assert [c.brief for c in dev.cmds(mark)] == [("QUERY", 1), ("SAVE", 0, 0)]
    assert not (await dev.vf()).tracking
    for nonblock in (True, False):
        with h.raises_errno(errno.ENODEV):
            await asyncio.wait_for(f.read(1, nonblock=nonblock), 2)
    await f.release()  # a second release is harmless


async def test_reads_after_release_of_an_ended_file(mlx5: h.Factory) -> None:
    """After STOP_COPY -> STOP the driver dropped its reference; the user's
    release ends the file: reads get ENODEV, nothing waits."""
    env = await mlx5()
    dev = await env.device()
    await dev.set_state(S.STOP)
    f = await dev.set_state(S.STOP_COPY)
    await f.read(5)
    await dev.set_state(S.STOP)
    await f.release()
    assert f.released
    for nonblock in (True, False):
        with h.raises_errno(errno.ENODEV):
            await asyncio.wait_for(f.read(1, nonblock=nonblock), 2)


class FaultingBuffer:
    """User memory whose copy_to_user faults after `good` pieces."""

    def __init__(self, size: int, good: int) -> None:
        self.buf = bytearray(size)
        self.good = good
        self.pieces = 0

    def __len__(self) -> int:
        return len(self.buf)

    def __setitem__(self, key: slice, value: memoryview) -> None:
        if self.pieces >= self.good:
            raise VfioError(errno.EFAULT, "user page gone")
        self.pieces += 1
        self.buf[key] = value


async def test_readinto_a_fault_after_some_pieces_is_a_short_read(mlx5: h.Factory) -> None:
    """readinto spanning queued buffers (the size record, the FW_DATA header,
    the image): a fault on the first piece is EFAULT and moves nothing; a
    fault on a later piece ends the read short with what was copied, and the
    next read starts right after it, so no byte of the stream is lost."""
    env = await mlx5("virtual")
    dev = await env.device(h.vf_config(64 * 1024))
    f = await dev.set_state(S.PRE_COPY)
    await env.settle(dev)
    info = await h.precopy_info(f)
    with h.raises_errno(errno.EFAULT):
        await f.readinto(FaultingBuffer(1 << 20, good=0))
    assert dev.saving_migf.f_pos == 0
    dest = FaultingBuffer(1 << 20, good=1)
    n = await f.readinto(dest)
    assert 0 < n < info.initial_bytes and dest.pieces == 1
    assert dev.saving_migf.f_pos == n
    rest = await h.read_available(f)
    stream = bytes(dest.buf[:n]) + rest
    assert len(stream) == info.initial_bytes
    h.parse_stream(stream)

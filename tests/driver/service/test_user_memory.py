"""User memory, the local data path: MapUserMemory maps a client's shared
memory segment into its address space, and ReadInto / WriteFrom are read(2)
and write(2) with a buffer there.  The bytes are the ones Read and Write move;
the errnos are the syscalls': EFAULT for a range outside one mapping, EBADF
for the wrong direction (checked before the range, as vfs_read does), ENOMSG
in PRE_COPY; ENOENT for a segment this host does not have.  A client's
mappings go when its session ends."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.service.usermap import MAX_MAPPING, MAX_MAPPINGS
from driver.vfio.uapi import MigState
from fwemu.hostmem import Segment, create_segment, default_shm_dir, unlink_segment
from tests.support import tls_mode
from tests.support.driver_service import (
    DriverUnderTest,
    VfioCallError,
    VfioClient,
    errno_of,
    parse_records,
    shm_segment,
)

S = MigState
pytestmark = pytest.mark.grpc
SEG = 1 << 20


@pytest.fixture(name="segment")
def segment_fixture() -> Iterator[Segment]:
    with shm_segment(SEG, "test-usermem") as seg:
        yield seg


async def map_(client: VfioClient, name: str, length: int) -> int:
    r = await client._call(
        client.stub.MapUserMemory, pb.MapUserMemoryRequest(shm_name=name, length=length)
    )
    return int(r.addr)


async def read_into(client: VfioClient, fd: int, addr: int, count: int, **kw: bool) -> int:
    r = await client._call(
        client.stub.ReadInto, pb.ReadIntoRequest(fd=fd, addr=addr, count=count, **kw)
    )
    return int(r.count)


async def write_from(client: VfioClient, fd: int, addr: int, count: int) -> int:
    r = await client._call(
        client.stub.WriteFrom, pb.WriteFromRequest(fd=fd, addr=addr, count=count)
    )
    return int(r.count)


async def stop_copy_pair(drv: DriverUnderTest, client: VfioClient) -> tuple[int, int]:
    """(saving fd in STOP_COPY, resuming fd) on two VFs."""
    src, dst = await drv.create_vfs(2)
    sfd = await client.open_device(src.name)
    dfd = await client.open_device(dst.name)
    await client.set_state(sfd, S.STOP)
    saving = await client.set_state(sfd, S.STOP_COPY)
    resuming = await client.set_state(dfd, S.RESUMING)
    return saving, resuming


async def test_a_migration_through_user_memory_moves_the_same_stream_as_read(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """ReadInto to the end of a STOP_COPY stream gives the record stream in
    the client's memory; WriteFrom of each piece loads it on another VF
    (RESUMING -> STOP validates it); 0 at the end, and again after it."""
    addr = await map_(client, segment.name, SEG)
    assert addr > 0 and addr % 4096 == 0
    saving, resuming = await stop_copy_pair(drv, client)
    stream = bytearray()
    while n := await read_into(client, saving, addr + 100, 200_000):
        assert 0 < n <= 200_000
        stream += segment.view[100 : 100 + n]
        assert await write_from(client, resuming, addr + 100, n) == n
    assert await read_into(client, saving, addr, 10) == 0
    assert len(parse_records(bytes(stream))) >= 2
    dst_fd = 4  # the second device fd of this client
    await client.set_state(dst_fd, S.STOP)  # fails unless every image loaded


async def test_ranges_outside_one_mapping_are_efault_and_lose_no_data(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """Past the end, before the start, an address never mapped: EFAULT, and
    the stream position does not move (the next good read starts at 0)."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    for bad in ((addr + SEG - 10, 11), (addr - 1, 10), (0x1000, 8)):
        assert await errno_of(read_into(client, saving, *bad)) == errno.EFAULT
        assert await errno_of(write_from(client, resuming, *bad)) == errno.EFAULT
    n = await read_into(client, saving, addr, 64)
    assert n == 64
    full, err = await client.read_all(saving)
    assert err is None
    parse_records(bytes(segment.view[:64]) + b"".join(full))


async def test_the_wrong_direction_is_ebadf_before_the_range_is_looked_at(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """vfs_read on a write-only fd (and vfs_write on a read-only one) is EBADF
    even with an unmapped buffer; a device fd is not a data fd (EINVAL, as
    Read says); an fd never opened is EBADF."""
    saving, resuming = await stop_copy_pair(drv, client)
    assert await errno_of(read_into(client, resuming, 0x1000, 10)) == errno.EBADF
    assert await errno_of(write_from(client, saving, 0x1000, 10)) == errno.EBADF
    assert await errno_of(read_into(client, 3, 0x1000, 10)) == errno.EINVAL
    assert await errno_of(read_into(client, 99, 0x1000, 10)) == errno.EBADF


async def test_precopy_read_into_answers_enomsg_when_empty(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """PRE_COPY: the initial bytes, then ENOMSG (empty for now), as read()."""
    addr = await map_(client, segment.name, SEG)
    _, fd = await drv.open_vf(client)
    dfd = await client.set_state(fd, S.PRE_COPY)
    initial = (await client.precopy_info(dfd)).initial_bytes
    got = 0
    with pytest.raises(VfioCallError) as info:
        while True:
            got += await read_into(client, dfd, addr, SEG)
    assert info.value.errno == errno.ENOMSG
    assert got == initial > 0


async def test_map_refuses_what_it_cannot_map(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """A segment this host has not (another host's): ENOENT; a name that is a
    path, a length of 0, over the limit or past the file's end: EINVAL."""
    assert await errno_of(map_(client, "no-such-segment-xyz", 4096)) == errno.ENOENT
    assert await errno_of(map_(client, "../etc/passwd", 4096)) == errno.EINVAL
    assert await errno_of(map_(client, segment.name, 0)) == errno.EINVAL
    assert await errno_of(map_(client, segment.name, MAX_MAPPING + 1)) == errno.EINVAL
    assert await errno_of(map_(client, segment.name, SEG + 1)) == errno.EINVAL


async def test_unmap_then_the_range_is_efault_and_addresses_are_not_reused(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    a = await map_(client, segment.name, SEG)
    await client._call(client.stub.UnmapUserMemory, pb.UnmapUserMemoryRequest(addr=a))
    assert (
        await errno_of(client._call(client.stub.UnmapUserMemory, pb.UnmapUserMemoryRequest(addr=a)))
        == errno.EINVAL
    )
    saving, _ = await stop_copy_pair(drv, client)
    assert await errno_of(read_into(client, saving, a, 10)) == errno.EFAULT
    b = await map_(client, segment.name, SEG)
    assert b > a


async def test_mappings_are_per_client_limited_and_go_with_the_session(
    inproc: DriverUnderTest, segment: Segment
) -> None:
    """Another client's address is not ours (EFAULT); MAX_MAPPINGS per client
    (then ENOMEM); a session's end unmaps everything."""
    async with (
        await VfioClient.connect(inproc.target) as a,
        await VfioClient.connect(inproc.target) as b,
    ):
        addr = await map_(a, segment.name, SEG)
        saving, _ = await stop_copy_pair(inproc, b)
        assert await errno_of(read_into(b, saving, addr, 10)) == errno.EFAULT
        for _ in range(MAX_MAPPINGS - 1):
            await map_(a, segment.name, 4096)
        assert await errno_of(map_(a, segment.name, 4096)) == errno.ENOMEM
        proc = inproc.server.servicer.processes[tls_mode.client_principal(), a.client_id]
        assert len(proc.memory) == MAX_MAPPINGS
        await a.end_session()
        for _ in range(100):
            if (tls_mode.client_principal(), a.client_id) not in inproc.server.servicer.processes:
                break
            await asyncio.sleep(0.02)
        assert len(proc.memory) == 0


async def test_a_driver_with_another_shm_dir_cannot_see_the_segment(
    tmp_path: os.PathLike[str], segment: Segment
) -> None:
    """The cross-host case on one machine: the driver looks in its own
    directory, the segment is not there: ENOENT (clients fall back to gRPC)."""
    from driver.registry import DeviceRegistry
    from driver.service.server import DriverServer
    from fwemu.link.inproc import InProcessLink
    from fwemu.model.clock import LoopClock
    from fwemu.model.firmware import Firmware

    server = DriverServer(
        DeviceRegistry(InProcessLink(Firmware(LoopClock(), seed=1))), shm_dir=str(tmp_path)
    )
    port = await server.start("127.0.0.1:0")
    try:
        async with await VfioClient.connect(f"127.0.0.1:{port}") as c:
            assert await errno_of(map_(c, segment.name, SEG)) == errno.ENOENT
    finally:
        await server.stop(0)


# --- the streams: requests ahead of their answers, errors in band ------------------------


async def stream(client: VfioClient, method: str, requests: list[object]) -> list[tuple[int, int]]:
    """Send every request at once, half-close, then read the answers: (count,
    errno) each.  The call must end OK."""
    call = getattr(client.stub, method)(metadata=client.metadata)
    for r in requests:
        await call.write(r)
    await call.done_writing()
    out = [(int(m.count), int(m.errno)) async for m in call]
    assert await call.code() == grpc.StatusCode.OK
    return out


async def findings(client: VfioClient) -> dict[str, int]:
    r = await client._call(client.stub.Audit, pb.AuditRequest())
    return dict(r.counts)


async def test_read_into_stream_reads_ahead_and_nothing_after_the_end(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """Sixteen reads of 64 KiB sent at once over a stream shorter than that:
    answered in order, the end once (0), the requests after it 0 without a
    read (no read-after-eof finding); the bytes are the record stream."""
    addr = await map_(client, segment.name, SEG)
    saving, _ = await stop_copy_pair(drv, client)
    piece = 64 << 10
    reqs = [pb.ReadIntoRequest(fd=saving, addr=addr + i * piece, count=piece) for i in range(16)]
    before = await findings(client)
    answers = await stream(client, "ReadIntoStream", reqs)
    counts = [c for c, _ in answers]
    assert all(e == 0 for _, e in answers)
    end = counts.index(0)
    assert 0 < end < 16 and all(c == piece for c in counts[: end - 1])
    assert counts[end:] == [0] * (16 - end)
    stream_bytes = b"".join(
        bytes(segment.view[i * piece : i * piece + c]) for i, c in enumerate(counts)
    )
    parse_records(stream_bytes)
    assert await findings(client) == before


async def test_read_into_stream_answers_errors_in_band_then_ecanceled(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """A failing read is answered with its errno and the requests after it
    with ECANCELED (not read), the call ending OK: on a write-only fd EBADF;
    an unmapped buffer EFAULT, after a good read; in PRE_COPY, ENOMSG once
    the initial bytes were read."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    r = pb.ReadIntoRequest
    assert await stream(client, "ReadIntoStream", [r(fd=resuming, addr=addr, count=10)] * 3) == [
        (0, errno.EBADF), (0, errno.ECANCELED), (0, errno.ECANCELED),
    ]  # fmt: skip
    answers = await stream(
        client,
        "ReadIntoStream",
        [r(fd=saving, addr=addr, count=100), r(fd=saving, addr=8, count=100),
         r(fd=saving, addr=addr, count=100)],
    )  # fmt: skip
    assert answers == [(100, 0), (0, errno.EFAULT), (0, errno.ECANCELED)]
    _, fd = await drv.open_vf(client)
    pre = await client.set_state(fd, S.PRE_COPY)
    initial = (await client.precopy_info(pre)).initial_bytes
    reqs = [r(fd=pre, addr=addr, count=SEG)] * 40
    answers = await stream(client, "ReadIntoStream", reqs)
    failed = next(i for i, (_, e) in enumerate(answers) if e)
    assert sum(c for c, _ in answers[:failed]) == initial
    assert answers[failed] == (0, errno.ENOMSG)
    assert {e for _, e in answers[failed + 1 :]} <= {errno.ECANCELED}


async def test_write_from_stream_loads_and_answers_errors_in_band(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """WriteFromStream takes a whole stream in pipelined writes (the
    destination then loads: RESUMING -> STOP); a write of garbage is answered
    with its errno, the writes after it ECANCELED, the call ending OK."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    data, err = await client.read_all(saving)
    assert err is None
    whole = b"".join(data)
    assert len(whole) <= SEG
    segment.view[: len(whole)] = whole
    half = len(whole) // 2
    w = pb.WriteFromRequest
    answers = await stream(
        client,
        "WriteFromStream",
        [w(fd=resuming, addr=addr, count=half), w(fd=resuming, addr=addr + half,
                                                   count=len(whole) - half)],
    )  # fmt: skip
    assert answers == [(half, 0), (len(whole) - half, 0)]
    await client.set_state(4, S.STOP)  # the destination device fd: loads and validates
    (other,) = await drv.create_vfs(1)
    dfd = await client.open_device(other.name)
    resuming2 = await client.set_state(dfd, S.RESUMING)
    segment.view[:4096] = b"\xff" * 4096
    answers = await stream(client, "WriteFromStream", [w(fd=resuming2, addr=addr, count=4096)] * 3)
    assert answers[0][1] not in (0, errno.ECANCELED)
    assert answers[1:] == [(0, errno.ECANCELED)] * 2


async def test_a_segment_shrunk_under_the_driver_is_efault_not_a_crash(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """The client owns the file and may truncate it after mapping: a copy
    into or out of bytes the file no longer has is EFAULT (touching them
    would have been SIGBUS), the stream loses nothing, and the driver serves
    on; grown back, the same range works."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    path = os.path.join(default_shm_dir(), segment.name)
    os.truncate(path, 100)
    assert await errno_of(write_from(client, resuming, addr, 4096)) == errno.EFAULT
    assert await errno_of(read_into(client, saving, addr, 4096)) == errno.EFAULT
    os.truncate(path, SEG)
    assert await read_into(client, saving, addr, 64) == 64
    head = bytes(segment.view[:64])
    rest, err = await client.read_all(saving)
    assert err is None
    parse_records(head + b"".join(rest))  # the EFAULT read took nothing from the stream


async def test_map_allocates_every_page_first(drv: DriverUnderTest, client: VfioClient) -> None:
    """A sparse segment is given its pages at map time (posix_fallocate), so
    a full tmpfs is ENOMEM there and never SIGBUS at a copy."""
    seg = create_segment(SEG, prefix="test-usermem-sparse")
    try:
        path = os.path.join(default_shm_dir(), seg.name)
        before = os.stat(path).st_blocks
        await map_(client, seg.name, SEG)
        assert os.stat(path).st_blocks * 512 >= SEG > before * 512
    finally:
        unlink_segment(seg.name)
        seg.close()


# --- several reads or writes in one request (`then`) ---------------------------------------


async def batched(
    client: VfioClient, method: str, requests: list[object]
) -> list[list[tuple[int, int]]]:
    """As `stream`, each answer with its `then` answers: one list per request."""
    call = getattr(client.stub, method)(metadata=client.metadata)
    for r in requests:
        await call.write(r)
    await call.done_writing()
    out = [
        [(int(m.count), int(m.errno))] + [(int(t.count), int(t.errno)) for t in m.then]
        async for m in call
    ]
    assert await call.code() == grpc.StatusCode.OK
    return out


def spans(addr: int, piece: int, n: int) -> list[pb.Span]:
    return [pb.Span(addr=addr + i * piece, count=piece) for i in range(n)]


async def test_read_into_stream_then_reads_each_span_in_order_in_one_answer(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """One request of sixteen 64 KiB reads (itself and 15 spans) is answered
    by one message whose counts are those of sixteen requests: in order, the
    end once (0), the reads after it 0 without a read; the bytes are the
    record stream, where each span said; a request after it is answered 0."""
    addr = await map_(client, segment.name, SEG)
    saving, _ = await stop_copy_pair(drv, client)
    piece = 64 << 10
    before = await findings(client)
    req = pb.ReadIntoRequest(fd=saving, addr=addr, count=piece, then=spans(addr + piece, piece, 15))
    after = pb.ReadIntoRequest(fd=saving, addr=addr, count=piece)
    answers = await batched(client, "ReadIntoStream", [req, after])
    assert [len(a) for a in answers] == [16, 1]
    counts = [c for c, _ in answers[0]]
    assert all(e == 0 for _, e in answers[0])
    end = counts.index(0)
    assert 0 < end < 16 and all(c == piece for c in counts[: end - 1])
    assert counts[end:] == [0] * (16 - end) and answers[1] == [(0, 0)]
    parse_records(
        b"".join(bytes(segment.view[i * piece : i * piece + c]) for i, c in enumerate(counts))
    )
    assert await findings(client) == before


async def test_a_failing_span_is_answered_in_band_and_the_rest_ecanceled(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """A span that fails (an unmapped buffer: EFAULT) is answered with its
    errno where it stands; the spans after it and the requests after that
    are ECANCELED, not read; the call ends OK and the stream lost nothing."""
    addr = await map_(client, segment.name, SEG)
    saving, _ = await stop_copy_pair(drv, client)
    req = pb.ReadIntoRequest(
        fd=saving, addr=addr, count=100,
        then=[pb.Span(addr=8, count=100), pb.Span(addr=addr + 100, count=100)],
    )  # fmt: skip
    answers = await batched(
        client, "ReadIntoStream", [req, pb.ReadIntoRequest(fd=saving, addr=addr, count=100)]
    )
    assert answers == [[(100, 0), (0, errno.EFAULT), (0, errno.ECANCELED)], [(0, errno.ECANCELED)]]
    head = bytes(segment.view[:100])
    rest, err = await client.read_all(saving)
    assert err is None
    parse_records(head + b"".join(rest))


@pytest.mark.parametrize("method", ["ReadIntoStream", "WriteFromStream"])
async def test_more_than_64_operations_in_a_request_are_einval_and_none_is_done(
    drv: DriverUnderTest, client: VfioClient, segment: Segment, method: str
) -> None:
    """64 operations in one request are served; 65 are refused whole with
    EINVAL (one answer, no `then`), none done, and the requests after it are
    ECANCELED: a client cannot make one message cost the driver unbounded
    work or answers."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    if method == "ReadIntoStream":
        r: object = pb.ReadIntoRequest(fd=saving, addr=addr, count=1, then=spans(addr, 0, 64))
        ok: object = pb.ReadIntoRequest(fd=saving, addr=addr, count=1, then=spans(addr + 1, 1, 63))
    else:
        r = pb.WriteFromRequest(fd=resuming, addr=addr, count=0, then=spans(addr, 0, 64))
        ok = pb.WriteFromRequest(fd=resuming, addr=addr, count=0, then=spans(addr, 0, 63))
    answers = await batched(client, method, [ok])
    assert len(answers[0]) == 64 and all(e == 0 for _, e in answers[0])
    answers = await batched(client, method, [r, ok])
    assert answers == [[(0, errno.EINVAL)], [(0, errno.ECANCELED)] * 64]
    if method == "ReadIntoStream":  # 64 bytes were read above, one at a time; nothing since
        head = bytes(segment.view[:1]) + bytes(segment.view[1:64])
        rest, err = await client.read_all(saving)
        assert err is None
        parse_records(head + b"".join(rest))


async def test_read_into_and_write_from_refuse_then_with_einval_and_do_nothing(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """The unary calls make one read(2) or write(2): `then` is EINVAL, and
    the stream position does not move."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    for call, fd in (("ReadInto", saving), ("WriteFrom", resuming)):
        make = pb.ReadIntoRequest if call == "ReadInto" else pb.WriteFromRequest
        req = make(fd=fd, addr=addr, count=64, then=[pb.Span(addr=addr, count=64)])
        assert await errno_of(client._call(getattr(client.stub, call), req)) == errno.EINVAL
    full, err = await client.read_all(saving)
    assert err is None
    parse_records(b"".join(full))


async def test_write_from_stream_then_loads_a_whole_stream_from_one_request(
    drv: DriverUnderTest, client: VfioClient, segment: Segment
) -> None:
    """A stream written as one request of several writes loads (RESUMING ->
    STOP validates it); each write's count is in the answer, in order."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    data, err = await client.read_all(saving)
    assert err is None
    whole = b"".join(data)
    segment.view[: len(whole)] = whole
    piece = -(-len(whole) // 5)
    cuts = [(i * piece, min(piece, len(whole) - i * piece)) for i in range(5)]
    req = pb.WriteFromRequest(
        fd=resuming, addr=addr + cuts[0][0], count=cuts[0][1],
        then=[pb.Span(addr=addr + o, count=n) for o, n in cuts[1:]],
    )  # fmt: skip
    assert await batched(client, "WriteFromStream", [req]) == [[(n, 0) for _, n in cuts]]
    await client.set_state(4, S.STOP)  # the destination device fd: loads and validates


@pytest.mark.parametrize("method", ["ReadIntoStream", "WriteFromStream"])
async def test_absurd_spans_are_efault_and_lose_no_data(
    drv: DriverUnderTest, client: VfioClient, segment: Segment, method: str
) -> None:
    """A span at the top of the address space, of 2^64 - 1 bytes, is EFAULT
    where it stands (nothing read or written, no huge allocation), the rest
    ECANCELED; the stream is whole afterwards."""
    addr = await map_(client, segment.name, SEG)
    saving, resuming = await stop_copy_pair(drv, client)
    top = (1 << 64) - 1
    absurd = [pb.Span(addr=top, count=top), pb.Span(addr=addr, count=top)]
    if method == "ReadIntoStream":
        req: object = pb.ReadIntoRequest(fd=saving, addr=addr, count=0, then=absurd)
    else:
        req = pb.WriteFromRequest(fd=resuming, addr=addr, count=0, then=absurd)
    answers = await batched(client, method, [req])
    assert answers == [[(0, 0), (0, errno.EFAULT), (0, errno.ECANCELED)]]
    full, err = await client.read_all(saving)
    assert err is None
    parse_records(b"".join(full))

"""Data fds over gRPC streams, and caller memory through DeviceFeature.

ReadStream is read(2) in a loop: it ends OK at the end of the stream (read
returned 0, STOP_COPY) and with the errno read failed with otherwise (ENOMSG
in PRE_COPY once what is available was sent); `limit` and `chunk_size` bound
it.  Write is one write(2) per message; WriteResponse.written is the total,
and on a failure the ErrorInfo's "written" says what earlier writes took.
DeviceFeature carries the memory that pointer fields point to (user_memory)
both ways."""

from __future__ import annotations

import asyncio
import errno

import pytest

from driver.mlx5.cmd import MIGRATION_HEADER
from driver.mlx5.resume import ResumeFile
from driver.vfio.uapi import (
    DMA_LOGGING_CONTROL,
    DMA_LOGGING_RANGE,
    DMA_LOGGING_REPORT,
    FEATURE_HEADER,
    MIGRATION,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    Feature,
    MigState,
)
from fwemu.link.ifc import VfCaps
from tests.support.driver_service import (
    GET,
    SET,
    DriverUnderTest,
    VfioCallError,
    VfioClient,
    parse_records,
)

S = MigState
PROBE = VFIO_DEVICE_FEATURE_PROBE
pytestmark = pytest.mark.grpc


async def stopped_source(drv: DriverUnderTest, client: VfioClient) -> tuple[int, int]:
    """A device in STOP_COPY and its saving fd."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    return fd, await client.set_state(fd, S.STOP_COPY)


async def test_read_stream_in_stop_copy_runs_to_the_end_and_ends_ok(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """STOP_COPY: read() returns 0 at the permanent end of stream, so the
    stream ends OK (never ENOMSG); what it sent is the whole record stream, and
    a read after it returns 0 again."""
    _, dfd = await stopped_source(drv, client)
    chunks, err = await client.read_all(dfd, chunk_size=64 * 1024)
    assert err is None
    stream = b"".join(chunks)
    records = parse_records(stream)
    assert records[0] == (8, 1, 1)  # STOP_COPY_SIZE first, optional
    assert [tag for _, _, tag in records[1:]] == [0] * (len(records) - 1)  # FW_DATA images
    assert len(stream) > 256 * 1024
    assert all(0 < len(c) <= 64 * 1024 for c in chunks)
    assert await client.read(dfd, 100) == b""
    chunks, err = await client.read_all(dfd)
    assert (chunks, err) == ([], None)


async def test_read_stream_in_pre_copy_sends_what_is_there_then_enomsg(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """PRE_COPY: the stream sends the initial bytes available now, then read()
    fails with ENOMSG (temporary end) and so does the stream: OUT_OF_RANGE."""
    _, fd = await drv.open_vf(client)
    dfd = await client.set_state(fd, S.PRE_COPY)
    info = await client.precopy_info(dfd)
    chunks, err = await client.read_all(dfd, chunk_size=100_000)
    assert err is not None and err.errno == errno.ENOMSG, err
    assert err.info.reason == "ENOMSG"
    assert sum(map(len, chunks)) == info.initial_bytes > 0
    assert [len(c) for c in chunks][:-1] == [100_000] * (len(chunks) - 1)
    parse_records(b"".join(chunks))
    assert (await client.precopy_info(dfd)).initial_bytes == 0


async def test_read_stream_stops_at_its_limit(drv: DriverUnderTest, client: VfioClient) -> None:
    """`limit`: at most that many bytes, then the stream ends OK; the next
    read continues where it stopped (the file position moved by exactly limit)."""
    _, dfd = await stopped_source(drv, client)
    chunks, err = await client.read_all(dfd, chunk_size=10, limit=25)
    assert err is None and [len(c) for c in chunks] == [10, 10, 5]
    head = b"".join(chunks)
    rest, err = await client.read_all(dfd, limit=1 << 40)
    assert err is None
    stream = head + b"".join(rest)
    assert MIGRATION_HEADER.unpack_from(stream, 0) == (8, 1, 1)
    parse_records(stream)


async def test_a_nonblocking_read_stream_on_an_empty_resume_side_fails(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """ReadStream reports the errno read() fails with, before any data: a
    resuming fd is write-only (EBADF)."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    resuming = await client.set_state(fd, S.RESUMING)
    chunks, err = await client.read_all(resuming, nonblock=True)
    assert chunks == [] and err is not None and err.errno == errno.EBADF


async def test_write_takes_a_stream_and_reports_the_total(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """A saved stream written back in odd segments (the resume parser does not
    care how writes are cut) is taken whole; RESUMING -> STOP then succeeds."""
    src, dst = await drv.create_vfs(2)
    sfd = await client.open_device(src.name)
    await client.set_state(sfd, S.STOP)
    saving = await client.set_state(sfd, S.STOP_COPY)
    chunks, err = await client.read_all(saving)
    assert err is None
    stream = b"".join(chunks)
    dfd = await client.open_device(dst.name)
    await client.set_state(dfd, S.STOP)
    resuming = await client.set_state(dfd, S.RESUMING)
    cut = [stream[i : i + 7777] for i in range(0, len(stream), 7777)]
    assert await client.write(resuming, [b"", *cut]) == len(stream)
    assert await client.set_state(dfd, S.STOP) == -1
    assert await client.write(resuming, []) == 0  # no write call at all
    assert await drv.link.digest(src.vhca_id) == await drv.link.digest(dst.vhca_id)


async def test_write_failure_says_how_much_earlier_writes_took(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """Each message is one write(2): the first (a valid record) is taken, the
    second (a mandatory record of an unknown tag) fails with EOPNOTSUPP, and
    the ErrorInfo metadata "written" is what the first took."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    resuming = await client.set_state(fd, S.RESUMING)
    good = MIGRATION_HEADER.pack(8, 1, 1) + (4096).to_bytes(8, "little")
    bad = MIGRATION_HEADER.pack(0, 0, 0x40)
    with pytest.raises(VfioCallError) as e:
        await client.write(resuming, [good, bad, good])
    assert e.value.errno == errno.EOPNOTSUPP
    assert e.value.written == len(good) == 24
    with pytest.raises(VfioCallError) as e:
        await client.write(resuming, [good])
    assert e.value.errno == errno.ENODEV and e.value.written == 0


async def test_each_write_message_is_one_write_call(
    inproc: DriverUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages are not merged or split: the file sees one write per message,
    with that message's bytes."""
    seen: list[int] = []
    original = ResumeFile.write

    async def spy(self: ResumeFile, data: bytes | memoryview) -> int:
        seen.append(len(data))
        return await original(self, data)

    monkeypatch.setattr(ResumeFile, "write", spy)
    (vf,) = await inproc.create_vfs()
    async with await VfioClient.connect(inproc.target) as client:
        fd = await client.open_device(vf.name)
        await client.set_state(fd, S.STOP)
        resuming = await client.set_state(fd, S.RESUMING)
        record = MIGRATION_HEADER.pack(8, 1, 1) + (4096).to_bytes(8, "little")
        parts = [record[:5], record[5:6], b"", record[6:], record * 3]
        assert await client.write(resuming, parts) == 4 * 24
    assert seen == [5, 1, 0, 18, 72]


async def test_probe_shows_what_the_device_offers(drv: DriverUnderTest, client: VfioClient) -> None:
    """MIGRATION GET gives STOP_COPY | P2P | PRE_COPY; PROBE answers without
    data for every feature the device has (DMA logging only with
    adv_virtualization: without it, ENOTTY)."""
    tracked, untracked = await drv.create_vfs(1) + await drv.create_vfs(
        1, caps=VfCaps(adv_virtualization=False)
    )
    for vf, logging in [(tracked, True), (untracked, False)]:
        fd = await client.open_device(vf.name)
        r = await client.device_feature(fd, 16, GET | Feature.MIGRATION, bytes(8))
        (flags,) = MIGRATION.unpack(r.data)
        assert flags == VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY
        assert (await client.device_feature(fd, 8, PROBE | GET | Feature.MIGRATION)).data == b""
        for feature, op in [
            (Feature.DMA_LOGGING_START, SET),
            (Feature.DMA_LOGGING_STOP, SET),
            (Feature.DMA_LOGGING_REPORT, GET),
        ]:
            if logging:
                await client.device_feature(fd, 8, PROBE | op | feature)
            else:
                with pytest.raises(VfioCallError) as e:
                    await client.device_feature(fd, 8, PROBE | op | feature)
                assert e.value.errno == errno.ENOTTY


async def test_dma_logging_report_fills_the_callers_bitmap(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """user_memory round trip: DMA_LOGGING_START reads the range array from the
    caller's memory (and copies the page size back into the struct);
    DMA_LOGGING_REPORT sets bits in the caller's bitmap buffer, which comes
    back in the response next to the other buffers, unchanged."""
    (vf,) = await drv.create_vfs(dirty_bytes_per_s=64 << 20)
    fd = await client.open_device(vf.name)
    ranges_at, bitmap_at, other_at = 0x10000, 0x20000, 0x30000
    region = 1 << 20
    ctl = DMA_LOGGING_CONTROL.pack(4096, 1, 0, ranges_at)
    r = await client.device_feature(
        fd,
        FEATURE_HEADER.size + DMA_LOGGING_CONTROL.size,
        SET | Feature.DMA_LOGGING_START,
        ctl,
        {ranges_at: DMA_LOGGING_RANGE.pack(0, region)},
    )
    assert DMA_LOGGING_CONTROL.unpack(r.data)[:2] == (4096, 1)
    assert r.user_memory == {ranges_at: DMA_LOGGING_RANGE.pack(0, region)}
    await asyncio.sleep(0.1)  # the running device dirties guest pages

    bitmap = bytes(region // 4096 // 8)
    report = DMA_LOGGING_REPORT.pack(0, region, 4096, bitmap_at)
    r = await client.device_feature(
        fd,
        FEATURE_HEADER.size + DMA_LOGGING_REPORT.size,
        GET | Feature.DMA_LOGGING_REPORT,
        report,
        {bitmap_at: bitmap, other_at: b"untouched"},
    )
    assert r.data == report and r.data_fd == -1
    assert set(r.user_memory) == {bitmap_at, other_at}
    assert r.user_memory[other_at] == b"untouched"
    dirty = r.user_memory[bitmap_at]
    assert len(dirty) == len(bitmap) and any(dirty)

    await client.device_feature(fd, 8, SET | Feature.DMA_LOGGING_STOP)

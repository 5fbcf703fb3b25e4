"""The bytes of a read on their way to the client (driver/api/wire.py): Read
and ReadStream read(2) straight into the gRPC answer (one copy of the data
in the driver, where a `bytes` of the data first made two), and the client
library takes ReadStream's answers off the wire itself (one copy, where the
protobuf runtime's parse and `.data` made two)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.mlx5.save import SaveFile
from driver.vfio.uapi import MigState
from tests.support.driver_service import DriverUnderTest, parse_records
from vfioclient import VfioClient

pytestmark = pytest.mark.grpc

S = MigState


@pytest.fixture(name="c")
async def client_fixture(drv: DriverUnderTest) -> AsyncIterator[VfioClient]:
    async with await VfioClient.connect(drv.target) as c:
        yield c


async def stop_copy(drv: DriverUnderTest, c: VfioClient) -> int:
    (vf,) = await drv.create_vfs()
    fd = await c.open_device(vf.name)
    await c.set_state(fd, S.STOP)
    data_fd = await c.set_state(fd, S.STOP_COPY)
    assert data_fd is not None
    return data_fd


async def test_read_and_read_stream_read_into_the_answer(
    drv: DriverUnderTest, c: VfioClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither makes a `bytes` of the data before the answer (SaveFile.read)."""

    async def no_copy(*_: object, **__: object) -> bytes:
        raise AssertionError("read into a bytes first")

    monkeypatch.setattr(SaveFile, "read", no_copy)
    data_fd = await stop_copy(drv, c)
    # A read may end short at the STOP_COPY_SIZE record (24 bytes) while the
    # SAVE has not landed yet, as mlx5vf_save_read does: read the 100 on.
    first = b""
    while len(first) < 100:
        got = await c.read(data_fd, 100 - len(first))
        assert got, "the stream ended within its first 100 bytes"
        first += got
    rest = [chunk async for chunk in c.read_stream(data_fd, chunk_size=64 * 1024)]
    stream = first + b"".join(rest)
    assert len(first) == 100 and all(0 < len(r) <= 64 * 1024 for r in rest)
    records = parse_records(stream)
    assert records[0] == (8, 1, 1)  # STOP_COPY_SIZE, then FW_DATA images
    assert [tag for _, _, tag in records[1:]] == [0] * (len(records) - 1)
    assert await c.read(data_fd, 100) == b""


async def test_the_client_reads_the_stream_without_the_protobuf_runtime(
    drv: DriverUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VfioClient.read_stream decodes each ReadResponse itself, and yields
    `bytes` as it did."""
    monkeypatch.setattr(
        pb.ReadResponse, "FromString", lambda _: pytest.fail("parsed by the protobuf runtime")
    )
    async with await VfioClient.connect(drv.target) as c:  # its stub made after the patch
        data_fd = await stop_copy(drv, c)
        chunks = [chunk async for chunk in c.read_stream(data_fd, chunk_size=64 * 1024)]
    assert chunks and all(type(chunk) is bytes for chunk in chunks)
    records = parse_records(b"".join(chunks))
    assert records[0] == (8, 1, 1) and len(records) > 1

"""What a call raises besides a VfioError is still an errno with ErrorInfo
(issue 11, item 5): a malformed Write message (DecodeError) and input nested
too deep (RecursionError) are EINVAL, a MemoryError ENOMEM, an OSError from
mmap its own errno -- never a bare UNKNOWN or INTERNAL."""

from __future__ import annotations

import errno
import mmap

import grpc
import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.service import usermap
from driver.service.errnos import DOMAIN
from driver.vfio.uapi import MigState
from grpcsvc.errors import error_info
from tests.support.driver_service import DriverUnderTest, VfioClient, errno_of, shm_segment

S = MigState
pytestmark = pytest.mark.grpc


async def test_malformed_write_message_is_einval_with_error_info(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """Raw bytes on the Write method that are no WriteRequest (a bytes field
    running past the message's end): EINVAL, and the fd is still usable."""
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    dfd = await client.set_state(fd, S.RESUMING)
    write = client.channel.stream_unary(
        "/vfio.v1.Vfio/Write",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.WriteResponse.FromString,
    )

    async def raw_requests():  # type: ignore[no-untyped-def]
        yield b"\x12\x05ab"

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await write(raw_requests(), metadata=client.metadata)
    info = error_info(e.value)
    assert info.code == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert (info.domain, info.reason, info.metadata["errno"]) == (
        DOMAIN,
        "EINVAL",
        str(errno.EINVAL),
    )
    assert await client.get_state(fd) == S.RESUMING
    assert await client.write(dfd, [b""]) == 0  # the stream was not touched


@pytest.mark.parametrize(
    ("raised", "want", "code"),
    [
        (MemoryError(), errno.ENOMEM, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RecursionError("maximum recursion depth"), errno.EINVAL, grpc.StatusCode.INVALID_ARGUMENT),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), errno.ENOMEM, None),
    ],
    ids=["MemoryError", "RecursionError", "OSError-from-mmap"],
)
async def test_unexpected_exceptions_become_their_errno(
    inproc: DriverUnderTest,
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    want: int,
    code: grpc.StatusCode | None,
) -> None:
    """The service maps the exception where it answers every call: the
    client reads the errno from ErrorInfo; the server goes on serving."""

    def failing_mmap(*args: object, **kw: object) -> mmap.mmap:
        raise raised

    async with await VfioClient.connect(inproc.target) as c:
        with shm_segment(1 << 16, "unexpected") as seg:
            monkeypatch.setattr(usermap.mmap, "mmap", failing_mmap)
            req = pb.MapUserMemoryRequest(shm_name=seg.name, length=1 << 16)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.stub.MapUserMemory(req, metadata=c.metadata)
        info = error_info(e.value)
        assert info.domain == DOMAIN and info.metadata["errno"] == str(want), info
        if code is not None:
            assert info.code == code
        monkeypatch.undo()
        assert await errno_of(c.close(77)) == errno.EBADF  # still serving

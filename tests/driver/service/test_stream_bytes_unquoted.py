"""Errno messages never quote stream or file bytes (issue 12, item 5).

A resuming stream written from a file (WriteFrom through a mapped segment)
may be a file the client cannot read itself; if an errno's message quoted
the record sizes, tags or image fields it refused, 8 bytes at a time would
leak.  Each refusal keeps its errno (mlx5vf_resume_write's) and says which
rule was broken, without the values: a record past the LOAD size, a
mandatory record of an unknown tag, an image past the client's buffer
budget, an image the firmware refuses (its syndrome's name, not its
diagnostic, which may quote the image)."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from driver.mlx5.cmd import MIGRATION_HEADER
from driver.vfio.uapi import MigState
from fwemu.hostmem import Segment
from tests.driver.service.test_user_memory import map_, write_from
from tests.support.driver_service import (
    DriverUnderTest,
    VfioCallError,
    VfioClient,
    shm_segment,
)

S = MigState
pytestmark = pytest.mark.grpc

SEG = 1 << 16
TAG_FW_DATA = 0


def _forms(value: int) -> list[str]:
    """How a number would show in a message."""
    return [str(value), f"{value:#x}", f"{value:x}", f"{value:X}"]


async def _refused(
    drv: DriverUnderTest, client: VfioClient, seg: Segment, stream: bytes
) -> VfioCallError:
    """WriteFrom `stream` (through the segment) into a new resuming fd: the error."""
    seg.view[: len(stream)] = stream
    _, fd = await drv.open_vf(client)
    await client.set_state(fd, S.STOP)
    resuming = await client.set_state(fd, S.RESUMING)
    addr = await map_(client, seg.name, SEG)
    with pytest.raises(VfioCallError) as e:
        await write_from(client, resuming, addr, len(stream))
    return e.value


def _quotes(message: str, stream: bytes, *values: int) -> bool:
    return any(f in message for v in values for f in _forms(v)) or stream[:8] in message.encode()


@pytest.fixture(name="seg")
def seg_fixture() -> Iterator[Segment]:
    with shm_segment(SEG, "test-unquoted") as seg:
        yield seg


async def test_a_record_past_the_load_size(
    drv: DriverUnderTest, client: VfioClient, seg: Segment
) -> None:
    size = 0x5EC12E7_0000_0001  # 8 "secret" bytes as a record size
    stream = MIGRATION_HEADER.pack(size, 0, TAG_FW_DATA)
    e = await _refused(drv, client, seg, stream)
    assert e.errno == errno.ENOMEM and "record larger than" in e.info.message
    assert not _quotes(e.info.message, stream, size)


async def test_a_mandatory_record_of_an_unknown_tag(
    drv: DriverUnderTest, client: VfioClient, seg: Segment
) -> None:
    tag = 0x5EC12E70
    stream = MIGRATION_HEADER.pack(0, 0, tag)
    e = await _refused(drv, client, seg, stream)
    assert e.errno == errno.EOPNOTSUPP and "unknown tag" in e.info.message
    assert not _quotes(e.info.message, stream, tag)


async def test_an_image_past_the_buffer_budget(
    drv: DriverUnderTest, client: VfioClient, seg: Segment
) -> None:
    drv.server.registry.budget.limit = 1 << 20
    size = (3 << 20) + 0x5EC
    stream = MIGRATION_HEADER.pack(size, 0, TAG_FW_DATA) + b"x"
    e = await _refused(drv, client, seg, stream)
    assert e.errno == errno.ENOMEM and "buffer budget" in e.info.message
    pages = -(-size // 4096) * 4096
    assert not _quotes(e.info.message, stream, size, pages)


async def test_an_image_the_firmware_refuses(
    drv: DriverUnderTest, client: VfioClient, seg: Segment
) -> None:
    image = struct.pack("<8Q", *range(0x5EC12E70, 0x5EC12E78)) * 64
    stream = MIGRATION_HEADER.pack(len(image), 0, TAG_FW_DATA) + image
    e = await _refused(drv, client, seg, stream)
    assert e.errno == errno.EINVAL  # cmd_status_to_err of the LOAD's status
    assert "LOAD_VHCA_STATE" in e.info.message and "IMAGE_BAD_MAGIC" in e.info.message
    assert "not a VHCA migration image" not in e.info.message  # the firmware's diagnostic
    assert not _quotes(e.info.message, image, *range(0x5EC12E70, 0x5EC12E78))

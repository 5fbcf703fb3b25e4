"""LOAD_VHCA_STATE bounds the state an image may declare: no larger than the
VF's size limit (its configured size plus as much again, at least 64 MiB;
README "Images and LOAD_VHCA_STATE").  A checksum-valid image declaring more
is refused and leaves the VF exactly as it was."""

from __future__ import annotations

import struct

import pytest

from fwemu.link.ifc import CmdStatus, GiB, MiB, Syndrome, VfConfig
from fwemu.model.device_state import DeviceState
from fwemu.model.image import (
    REC_TABLE,
    Cursor,
    ImageKind,
    Plan,
    PlanItem,
    write_piece,
)
from fwemu.model.vf import size_limit

pytestmark = pytest.mark.remote_memory


def declaring(arena_size: int) -> bytes:
    """A checksum-valid full image (chain start) whose object table declares an
    arena of `arena_size` bytes: one QP covering it, and no data."""
    table = struct.pack("<QII", arena_size, 2, 1) + struct.pack("<HHIQQ", 0, 0, 1, 0, arena_size)
    DeviceState.parse_table(table)  # what the firmware accepts as a table
    plan = Plan([PlanItem(REC_TABLE, table=table)])
    dest = memoryview(bytearray(4096))
    r = write_piece(
        dest, plan, Cursor(), DeviceState.empty().arena,
        kind=ImageKind.FULL, chain_id=7, seq=0, piece=0, whole=True,
    )  # fmt: skip
    return bytes(dest[: r.size])


@pytest.mark.parametrize("declared", [4 * GiB, 64 * GiB, 1 << 63], ids=["4GiB", "64GiB", "2^63"])
async def test_an_image_beyond_the_size_limit_is_refused(h, declared: int) -> None:
    vhca = await h.vf(size=1 * MiB, dirty_bytes_per_s=0)
    await h.suspend_fully(vhca)
    before, info = await h.digest(vhca), await h.info(vhca)
    res = await h.load(vhca, declaring(declared))
    assert (res.status, res.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.IMAGE_TOO_LARGE), res
    assert str(declared) in res.diagnostic
    assert await h.digest(vhca) == before
    assert (await h.info(vhca)).num_objects == info.num_objects
    assert len(await h.link.list_vfs()) == 1


async def test_an_image_at_the_size_limit_loads(h) -> None:
    """The limit is exact: a state of size_limit bytes loads, one byte more does not."""
    vhca = await h.vf(size=1 * MiB, dirty_bytes_per_s=0)
    await h.suspend_fully(vhca)
    limit = size_limit((await h.info(vhca)).config)
    assert limit == 65 * MiB
    refused = await h.load(vhca, declaring(limit + 1))
    assert refused.syndrome == Syndrome.IMAGE_TOO_LARGE
    assert (await h.load(vhca, declaring(limit))).ok
    assert (await h.info(vhca)).num_objects == 1


def test_the_size_limit_grows_with_the_vf() -> None:

    assert size_limit(VfConfig(size=4 * MiB)) == 68 * MiB
    assert size_limit(VfConfig(size=1 * GiB)) == 2 * GiB
    assert size_limit(VfConfig(size=VfConfig.MAX_SIZE)) == 2 * VfConfig.MAX_SIZE


async def test_a_reconfiguration_beyond_the_size_limit_is_refused(h) -> None:
    """Reconfigurations stop at the same limit, so a VF's images always load
    into a VF of the same configuration."""
    vhca = await h.vf(size=1 * MiB, dirty_bytes_per_s=0)
    before = await h.digest(vhca)
    with pytest.raises(Exception, match="size limit") as e:
        await h.link.reconfigure(vhca, [("QP", 64 * MiB + 1)])
    assert not isinstance(e.value, MemoryError), e.value
    assert await h.digest(vhca) == before
    await h.link.reconfigure(vhca, [("QP", 64 * MiB)])
    assert (await h.info(vhca)).num_objects > 1

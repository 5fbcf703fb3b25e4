"""LOAD_VHCA_STATE: only on a fully suspended VF; refusals name the reason and
leave the target exactly as it was."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import xxhash

from fwemu.link.ifc import CmdStatus, KiB, Syndrome, VfCaps
from fwemu.model.image import IMAGE_HEADER_SIZE

# These tests move image bytes: run them with firmware-held memory too.
pytestmark = pytest.mark.remote_memory

BAD_PARAM = CmdStatus.BAD_PARAM_ERR

# Header layout (fwemu/model/image.py): magic 0..4, version 4..6, kind 6, flags 7,
# profile 8..12, chain id 12..20, seq 20..24, piece 24..28, payload length 28..36,
# payload checksum 36..44, header checksum 44..52.
PROFILE_AT = 8
PAYLOAD_LEN_AT = 28
PAYLOAD_SUM_AT = 36
HEADER_SUM_AT = 44


def reseal(img: bytearray) -> bytes:
    """Recompute both checksums, as a firmware that wrote these bytes would."""
    n = int.from_bytes(img[PAYLOAD_LEN_AT : PAYLOAD_LEN_AT + 8], "little")
    payload_sum = xxhash.xxh3_64_intdigest(bytes(img[IMAGE_HEADER_SIZE : IMAGE_HEADER_SIZE + n]))
    img[PAYLOAD_SUM_AT:HEADER_SUM_AT] = payload_sum.to_bytes(8, "little")
    header_sum = xxhash.xxh3_64_intdigest(bytes(img[:HEADER_SUM_AT]))
    img[HEADER_SUM_AT:IMAGE_HEADER_SIZE] = header_sum.to_bytes(8, "little")
    return bytes(img)


def flip(img: bytes, at: int) -> bytes:
    b = bytearray(img)
    b[at] ^= 0x5A
    return bytes(b)


@dataclass
class Chain:
    src: int
    dst: int
    images: list[bytes]  # full tracked, incremental tracked, final incremental
    source_digest: str


async def make_chain(h) -> Chain:
    """A source migrated into three images; the target fully suspended."""
    src = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    dst = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    images = [await h.save_ok(src, (await h.query(src)).required_umem_size, set_track=True)]
    await h.advance(0.5)
    q = await h.query(src, incremental=True)
    images.append(await h.save_ok(src, q.required_umem_size, incremental=True, set_track=True))
    await h.advance(0.5)
    await h.suspend_fully(src)
    q = await h.query(src, incremental=True)
    images.append(await h.save_ok(src, q.required_umem_size, incremental=True))
    assert all(len(i) > IMAGE_HEADER_SIZE for i in images)
    await h.advance(0.3)  # the target's workload changes it before it stops
    await h.suspend_fully(dst)
    return Chain(src, dst, images, await h.digest(src))


async def assert_refused(h, vhca: int, data: bytes, syndrome: int, **kw) -> None:
    """LOAD is refused with BAD_PARAM (0x3) and `syndrome`; the VF is unchanged."""
    before = await h.digest(vhca)
    res = await h.load(vhca, data, **kw)
    assert (res.status, res.syndrome) == (BAD_PARAM, syndrome), res
    assert res.status == 0x3
    assert res.diagnostic
    assert await h.digest(vhca) == before


async def finish(h, c: Chain, start: int) -> None:
    """Load the rest of the chain: it still reproduces the source."""
    for img in c.images[start:]:
        res = await h.load(c.dst, img)
        assert res.ok, res
    assert await h.digest(c.dst) == c.source_digest


async def test_the_whole_chain_loads(h):
    """The chain of a live migration (full, incremental, final) loads in order and reproduces the
    source."""
    c = await make_chain(h)
    await finish(h, c, 0)


@pytest.mark.parametrize("suspended", ["none", "initiator"])
async def test_load_needs_a_fully_suspended_vf(h, suspended):
    """LOAD on a VF whose responder still runs: BAD_RES_STATE / NOT_SUSPENDED."""
    src = await h.vf(size=64 * KiB)
    dst = await h.vf(size=64 * KiB, dirty_bytes_per_s=0)
    await h.suspend_fully(src)
    img = await h.save_ok(src, (await h.query(src)).required_umem_size)
    if suspended == "initiator":
        assert (await h.suspend(dst, 0)).ok
    before = await h.digest(dst)
    res = await h.load(dst, img)
    assert (res.status, res.syndrome) == (CmdStatus.BAD_RES_STATE_ERR, Syndrome.NOT_SUSPENDED)
    assert await h.digest(dst) == before
    if suspended == "none":
        assert (await h.suspend(dst, 0)).ok
    assert (await h.suspend(dst, 1)).ok
    assert (await h.load(dst, img)).ok
    assert await h.digest(dst) == await h.digest(src)


@pytest.mark.parametrize("which", [0, 1, 2])
async def test_corrupted_payload_byte_is_image_checksum(h, which):
    """Any corrupted payload byte of any image of the chain is IMAGE_CHECKSUM; the correct image
    loads afterwards."""
    c = await make_chain(h)
    for img in c.images[:which]:
        assert (await h.load(c.dst, img)).ok
    img = c.images[which]
    for at in (IMAGE_HEADER_SIZE, IMAGE_HEADER_SIZE + 17, len(img) // 2, len(img) - 1):
        await assert_refused(h, c.dst, flip(img, at), Syndrome.IMAGE_CHECKSUM)
    await finish(h, c, which)


@pytest.mark.parametrize("at", [4, 6, 7, 9, 13, 21, 25, 30, 40, 47, 51])
async def test_corrupted_header_byte_is_image_checksum(h, at):
    """Every header field is covered by the header checksum."""
    c = await make_chain(h)
    assert (await h.load(c.dst, c.images[0])).ok
    await assert_refused(h, c.dst, flip(c.images[1], at), Syndrome.IMAGE_CHECKSUM)
    await finish(h, c, 1)


async def test_corrupted_magic_is_refused(h):
    """An image without the VHCA magic is refused (BAD_PARAM)."""
    c = await make_chain(h)
    before = await h.digest(c.dst)
    res = await h.load(c.dst, flip(c.images[0], 0))
    assert res.status == BAD_PARAM
    assert res.syndrome in (Syndrome.IMAGE_BAD_MAGIC, Syndrome.IMAGE_CHECKSUM)
    assert await h.digest(c.dst) == before
    await finish(h, c, 0)


@pytest.mark.parametrize("cut", [1, 100, "half", "header-1", "header", "header+1"])
async def test_truncated_image_is_image_truncated(h, cut):
    """A LOAD shorter than the image its header describes: IMAGE_TRUNCATED."""
    c = await make_chain(h)
    img = c.images[0]
    keep = {
        "half": len(img) // 2,
        "header-1": IMAGE_HEADER_SIZE - 1,
        "header": IMAGE_HEADER_SIZE,
        "header+1": IMAGE_HEADER_SIZE + 1,
    }.get(cut, len(img) - cut if isinstance(cut, int) else 0)
    await assert_refused(h, c.dst, img[:keep], Syndrome.IMAGE_TRUNCATED)
    # The size field alone short of the bytes in the buffer is the same thing.
    await assert_refused(h, c.dst, img, Syndrome.IMAGE_TRUNCATED, size=keep)
    await finish(h, c, 0)


@pytest.mark.parametrize("extra", [1, 16, 4096])
async def test_trailing_bytes_are_image_trailing(h, extra):
    """A LOAD longer than its image: IMAGE_TRAILING."""
    c = await make_chain(h)
    await assert_refused(h, c.dst, c.images[0] + bytes(extra), Syndrome.IMAGE_TRAILING)
    await finish(h, c, 0)


async def test_swapped_images_are_out_of_order(h):
    """Incremental images load in chain order: a skipped or repeated one is IMAGE_OUT_OF_ORDER."""
    c = await make_chain(h)
    assert (await h.load(c.dst, c.images[0])).ok
    await assert_refused(h, c.dst, c.images[2], Syndrome.IMAGE_OUT_OF_ORDER)
    assert (await h.load(c.dst, c.images[1])).ok
    await assert_refused(h, c.dst, c.images[1], Syndrome.IMAGE_OUT_OF_ORDER)  # a repeat
    await finish(h, c, 2)


@pytest.mark.parametrize("which", [1, 2])
async def test_incremental_image_first_is_out_of_order(h, which):
    """An incremental image with no full image before it is IMAGE_OUT_OF_ORDER."""
    c = await make_chain(h)
    await assert_refused(h, c.dst, c.images[which], Syndrome.IMAGE_OUT_OF_ORDER)
    await finish(h, c, 0)


async def test_incremental_from_another_chain_is_image_foreign(h):
    """After a full image of this chain, an incremental image of another VF's
    chain: IMAGE_FOREIGN."""
    c = await make_chain(h)
    other = await h.vf(size=128 * KiB, dirty_bytes_per_s=64 * KiB)
    await h.save_ok(other, (await h.query(other)).required_umem_size, set_track=True)
    await h.advance(0.5)
    q = await h.query(other, incremental=True)
    foreign = await h.save_ok(other, q.required_umem_size, incremental=True, set_track=True)
    assert (await h.load(c.dst, c.images[0])).ok
    await assert_refused(h, c.dst, foreign, Syndrome.IMAGE_FOREIGN)
    await finish(h, c, 1)


@pytest.mark.parametrize(
    ("at", "value", "syndrome"),
    [
        pytest.param(PROFILE_AT, 0x12345678, Syndrome.IMAGE_FOREIGN, id="another-profile"),
        pytest.param(IMAGE_HEADER_SIZE, 0x77, Syndrome.IMAGE_MALFORMED, id="unknown-record-type"),
    ],
)
async def test_correctly_checksummed_image_with_a_bad_field_is_refused(h, at, value, syndrome):
    """A correctly checksummed image of another firmware profile is IMAGE_FOREIGN; one whose
    first record has an unknown type is IMAGE_MALFORMED."""
    c = await make_chain(h)
    img = bytearray(c.images[0])
    img[at : at + 4] = value.to_bytes(4, "little")
    await assert_refused(h, c.dst, reseal(img), syndrome)
    await finish(h, c, 0)


async def test_a_full_image_restarts_the_chain(h):
    """A full image may abandon an unfinished chain (multi_load)."""
    c = await make_chain(h)
    assert (await h.load(c.dst, c.images[0])).ok
    assert (await h.load(c.dst, c.images[1])).ok
    await finish(h, c, 0)


async def test_resuming_the_responder_ends_the_load_chain(h):
    """README: resuming the responder ends the load chain."""
    c = await make_chain(h)
    assert (await h.load(c.dst, c.images[0])).ok
    assert (await h.resume(c.dst, 0)).ok
    assert (await h.suspend(c.dst, 1)).ok
    await assert_refused(h, c.dst, c.images[1], Syndrome.IMAGE_OUT_OF_ORDER)
    await finish(h, c, 0)


async def test_vf_without_multi_load_accepts_exactly_one_load_per_suspension(h):
    """README: without migration_multi_load only one LOAD is accepted per suspension."""
    src = await h.vf(size=64 * KiB)
    dst = await h.vf(size=64 * KiB, caps=VfCaps(migration_multi_load=False))
    await h.suspend_fully(src)
    img = await h.save_ok(src, (await h.query(src)).required_umem_size)
    await h.suspend(dst, 0)
    await h.suspend(dst, 1)
    assert (await h.load(dst, img)).ok
    res = await h.load(dst, img)
    assert (res.status, res.syndrome) == (BAD_PARAM, Syndrome.CAP_MISSING)
    await h.resume(dst, 0)
    await h.suspend(dst, 1)
    assert (await h.load(dst, img)).ok


async def test_a_refused_load_keeps_the_chain_position(h):
    """Refusals in the middle of a chain: the correct next image still loads."""
    c = await make_chain(h)
    assert (await h.load(c.dst, c.images[0])).ok
    await assert_refused(
        h, c.dst, flip(c.images[1], IMAGE_HEADER_SIZE + 3), Syndrome.IMAGE_CHECKSUM
    )
    await assert_refused(h, c.dst, c.images[1][:-1], Syndrome.IMAGE_TRUNCATED)
    await assert_refused(h, c.dst, c.images[1] + b"\0", Syndrome.IMAGE_TRAILING)
    await finish(h, c, 1)

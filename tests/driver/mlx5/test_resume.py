"""The resuming side (mlx5vf_resume_write, reference §5.9): a record parser
over an arbitrary byte stream, one LOAD_VHCA_STATE per FW_DATA image inside
write(), and its errors (EOPNOTSUPP, ENOMEM, the firmware's refusal as EINVAL,
ENODEV once in ERROR)."""

from __future__ import annotations

import asyncio
import errno
import functools
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver.mlx5.cmd import MigfState
from driver.registry import DeviceRegistry
from driver.vfio.uapi import MigState
from fwemu.link.ifc import CmdStatus, KiB, Syndrome
from fwemu.link.inproc import InProcessLink
from fwemu.model import Firmware, VirtualClock
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(90)

SIZE = 48 * KiB


async def source_stream(env: h.Mlx5Env, size: int = SIZE) -> tuple[bytes, str]:
    src = await env.device(h.vf_config(size, dirty=1 << 20))
    return await h.pre_copy_stream(env, src)


async def resuming(dev: h.Dev) -> Any:
    return await dev.walk(S.STOP, S.RESUMING)


def loads(dev: h.Dev, mark: int = 0) -> list[Any]:
    return [c for c in dev.cmds(mark) if c.name == "LOAD"]


# --------------------------------------------------------------------------------------
# any segmentation gives the same device
# --------------------------------------------------------------------------------------


async def test_one_write_loads_every_image_and_reproduces_the_source(mlx5_wide: h.Factory) -> None:
    """§5.9: one write of the whole stream returns its full length, loads each
    FW_DATA image once, in order (LOAD size = record_size), and the target's
    digest equals the source's."""
    env = await mlx5_wide("virtual")
    stream, digest = await source_stream(env)
    images = [r for r in h.parse_stream(stream) if r.tag == h.TAG_FW_DATA]
    assert len(images) == 4  # full, 2 incremental, final
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming(dst)
    mark = dst.mark()
    assert await f.write(stream) == len(stream)
    sent = loads(dst, mark)
    assert [c.args["size"] for c in sent] == [r.size for r in images]
    assert all(c.result.ok for c in sent)
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest
    assert (await dst.vf()).loaded_bytes == sum(r.size for r in images)


async def test_byte_at_a_time_reproduces_the_source(mlx5: h.Factory) -> None:
    """§4/§5.9: write segmentation need not match the read segmentation: one
    byte per write gives the same device; each image is loaded as soon as its
    last byte arrived, inside that write."""
    env = await mlx5("virtual")
    stream, digest = await source_stream(env, 16 * KiB)
    images = [r for r in h.parse_stream(stream) if r.tag == h.TAG_FW_DATA]
    ends = {r.offset + h.REC_HEADER.size + r.size for r in images}
    dst = await env.device(h.vf_config(16 * KiB))
    f = await resuming(dst)
    mark = dst.mark()
    for i in range(len(stream)):
        assert await f.write(stream[i : i + 1]) == 1
        if i + 1 in ends:
            assert len(loads(dst, mark)) == len([e for e in ends if e <= i + 1])
    assert len(loads(dst, mark)) == len(images)
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest


async def test_random_splits_reproduce_the_source(mlx5_wide: h.Factory) -> None:
    """§4: random write segmentation (seeded), on both adapters."""
    env = await mlx5_wide("virtual")
    stream, digest = await source_stream(env)
    rng = random.Random(1234)
    for _ in range(3):
        cuts = [rng.randrange(len(stream)) for _ in range(rng.randrange(1, 60))]
        dst = await env.device(h.vf_config(SIZE))
        f = await resuming(dst)
        await h.write_all(f, stream, cuts)
        await dst.set_state(S.STOP)
        assert await dst.digest() == digest


async def _produce_stream() -> tuple[bytes, str]:
    fw = Firmware(VirtualClock(), seed=11)
    link = InProcessLink(fw)
    env = h.Mlx5Env("inproc", fw, link, DeviceRegistry(link), True)
    try:
        return await source_stream(env, 24 * KiB)
    finally:
        await env.close()
        await link.close()


@functools.cache
def hypothesis_stream() -> tuple[bytes, str]:
    """One source stream for all the examples (made once, on its own loop)."""
    return asyncio.run(_produce_stream())


async def _load_split(stream: bytes, cuts: list[int]) -> str:
    fw = Firmware(VirtualClock(), seed=99)
    link = InProcessLink(fw)
    env = h.Mlx5Env("inproc", fw, link, DeviceRegistry(link), True)
    try:
        dst = await env.device(h.vf_config(24 * KiB))
        f = await resuming(dst)
        await h.write_all(f, stream, cuts)
        await dst.set_state(S.STOP)
        return await dst.digest()
    finally:
        await env.close()
        await link.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_split_reproduces_the_source_hypothesis(data: st.DataObject) -> None:
    """§4: for any write segmentation (cut points anywhere, or close to record
    boundaries) the target ends with the source's digest (in-process adapter:
    each example runs on a fresh firmware and event loop)."""
    stream, digest = hypothesis_stream()
    bounds = [r.offset for r in h.parse_stream(stream)] + [len(stream)]
    near = st.builds(lambda b, d: b + d, st.sampled_from(bounds), st.integers(-20, 20))
    cuts = data.draw(
        st.lists(st.one_of(st.integers(0, len(stream)), near), max_size=40), label="cuts"
    )
    assert asyncio.run(_load_split(stream, cuts)) == digest


# --------------------------------------------------------------------------------------
# the record parser
# --------------------------------------------------------------------------------------


async def test_optional_unknown_records_are_skipped(mlx5: h.Factory) -> None:
    """§5.9: a record with an unknown tag and the OPTIONAL flag is skipped
    (payload of any size, also larger than the header buffer), wherever it
    appears; the device ends as without them."""
    env = await mlx5("virtual")
    stream, digest = await source_stream(env)
    recs = h.parse_stream(stream)
    extras = [
        h.record(b"", tag=2, flags=h.FLAG_OPTIONAL),
        h.record(b"x" * 5, tag=0x80, flags=h.FLAG_OPTIONAL),
        h.record(bytes(range(256)) * 40, tag=0xFFFFFFFF, flags=h.FLAG_OPTIONAL | 0x10),
    ]
    mixed = bytearray()
    for i, r in enumerate(recs):
        mixed += extras[i % len(extras)]
        mixed += stream[r.offset : r.offset + h.REC_HEADER.size + r.size]
    mixed += extras[0] + extras[2]
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming(dst)
    mark = dst.mark()
    await h.write_all(f, bytes(mixed), list(range(0, len(mixed), 999)))
    assert len(loads(dst, mark)) == len(recs) - 1
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest


async def test_known_tags_do_not_need_flags(mlx5: h.Factory) -> None:
    """§5.9: STOP_COPY_SIZE is recognised by its tag whatever its flags; the
    stream also loads without it (it only pre-sizes the image buffer)."""
    env = await mlx5("virtual")
    stream, digest = await source_stream(env)
    recs = h.parse_stream(stream)
    assert recs[0].tag == h.TAG_STOP_COPY_SIZE
    rest = stream[recs[1].offset :]
    for variant in (h.record(recs[0].payload, tag=h.TAG_STOP_COPY_SIZE, flags=0) + rest, rest):
        dst = await env.device(h.vf_config(SIZE))
        f = await resuming(dst)
        assert await f.write(variant) == len(variant)
        await dst.set_state(S.STOP)
        assert await dst.digest() == digest


@pytest.mark.parametrize("tag", [2, 3, 0x100, 0xFFFFFFFF])
async def test_unknown_mandatory_tag_is_eopnotsupp_and_latches(mlx5: h.Factory, tag: int) -> None:
    """§5.9: an unknown tag without OPTIONAL -> EOPNOTSUPP (as soon as its header
    is complete); the file latches ERROR (next write ENODEV); RESUMING -> STOP
    still succeeds (it only disables the fd)."""
    env = await mlx5("virtual")
    stream, _ = await source_stream(env)
    first = h.parse_stream(stream)[1]
    prefix = stream[: first.offset]  # the STOP_COPY_SIZE record
    dst = await env.device(h.vf_config(SIZE))
    before = await dst.digest()
    f = await resuming(dst)
    bad = h.REC_HEADER.pack(4, 0, tag)
    assert await f.write(prefix + bad[:15]) == len(prefix) + 15
    with h.raises_errno(errno.EOPNOTSUPP):
        await f.write(bad[15:] + b"abcd")
    with h.raises_errno(errno.ENODEV):
        await f.write(stream[first.offset :])
    assert loads(dst) == []
    assert await dst.set_state(S.STOP) is None
    assert await dst.digest() == before


@pytest.mark.parametrize("tag", [h.TAG_FW_DATA, h.TAG_STOP_COPY_SIZE, 0x55])
async def test_record_size_above_u32_is_enomem(mlx5: h.Factory, tag: int) -> None:
    """§5.9: record_size > 2^32-1 -> ENOMEM, whatever the tag (checked first)."""
    env = await mlx5()
    dst = await env.device()
    f = await resuming(dst)
    with h.raises_errno(errno.ENOMEM):
        await f.write(h.REC_HEADER.pack(1 << 32, h.FLAG_OPTIONAL, tag))
    with h.raises_errno(errno.ENODEV):
        await f.write(b"\0")
    f2 = await dst.walk(S.STOP, S.RESUMING)
    with h.raises_errno(errno.ENOMEM):
        await f2.write(h.REC_HEADER.pack((1 << 64) - 1, 0, h.TAG_FW_DATA))


@pytest.mark.parametrize("which", [0, 1], ids=["full-image", "incremental-image"])
async def test_corrupt_image_is_refused_and_changes_nothing(
    mlx5_wide: h.Factory, which: int
) -> None:
    """§5.9 LOAD_IMAGE: a corrupt image (one byte flipped in an FW_DATA payload)
    is refused by the firmware (BAD_PARAM / IMAGE_CHECKSUM): write() fails with
    EINVAL, the file latches ERROR (next write ENODEV) and the target holds
    what it held before that image (a refused LOAD changes nothing)."""
    env = await mlx5_wide("virtual")
    stream, _ = await source_stream(env)
    images = [r for r in h.parse_stream(stream) if r.tag == h.TAG_FW_DATA]
    victim = images[which]
    start = victim.offset + h.REC_HEADER.size
    good_prefix = stream[: victim.offset]

    bad = bytearray(stream)
    bad[start + h.IMAGE_HEADER + victim.size // 2] ^= 0x40
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming(dst)
    assert await f.write(good_prefix) == len(good_prefix)  # the images before it
    expect = await dst.digest()
    mark = dst.mark()
    with h.raises_errno(errno.EINVAL):
        await f.write(bytes(bad[victim.offset :]))
    [refused] = loads(dst, mark)
    assert refused.result.status == CmdStatus.BAD_PARAM_ERR
    assert refused.result.syndrome == Syndrome.IMAGE_CHECKSUM
    assert len(loads(dst)) == which + 1
    assert dst.mvdev.resuming_migf is f and f.state == MigfState.ERROR
    with h.raises_errno(errno.ENODEV):
        await f.write(stream[start:])
    assert await dst.digest() == expect


async def test_corrupt_first_image_leaves_the_target_untouched(mlx5: h.Factory) -> None:
    """§5.9: the target's digest before RESUMING equals its digest after a
    refused first image."""
    env = await mlx5("virtual")
    stream, digest = await source_stream(env)
    first = h.parse_stream(stream)[1]
    bad = bytearray(stream)
    bad[first.offset + h.REC_HEADER.size + first.size - 1] ^= 1
    dst = await env.device(h.vf_config(SIZE))
    await dst.set_state(S.STOP)
    before = await dst.digest()
    assert before != digest
    f = await dst.set_state(S.RESUMING)
    with h.raises_errno(errno.EINVAL):
        await f.write(bytes(bad))
    assert await dst.digest() == before
    await dst.set_state(S.STOP)
    assert await dst.digest() == before


async def test_image_out_of_order_is_refused(mlx5: h.Factory) -> None:
    """§5.9: the firmware refuses an incremental image without its chain's full
    image (BAD_PARAM / IMAGE_OUT_OF_ORDER): EINVAL, nothing changes."""
    env = await mlx5("virtual")
    stream, _ = await source_stream(env)
    recs = h.parse_stream(stream)
    without_full = stream[: recs[1].offset] + stream[recs[2].offset :]
    dst = await env.device(h.vf_config(SIZE))
    await dst.set_state(S.STOP)
    before = await dst.digest()
    f = await dst.set_state(S.RESUMING)
    with h.raises_errno(errno.EINVAL):
        await f.write(without_full)
    assert loads(dst)[-1].result.syndrome == Syndrome.IMAGE_OUT_OF_ORDER
    assert await dst.digest() == before


@pytest.mark.parametrize("cut", ["mid-header", "mid-image", "header-only"])
async def test_truncated_stream_then_stop_succeeds_and_drops_the_partial_record(
    mlx5: h.Factory, cut: str
) -> None:
    """§5.7/§5.9 (mlx5vf as it is): RESUMING -> STOP only disables the fds; an
    incomplete trailing record is silently dropped and the arc succeeds.  The
    target holds exactly what the complete records made.  (The uAPI asks the
    driver to validate the data at RESUMING -> STOP; mlx5vf does not.)"""
    env = await mlx5("virtual")
    stream, digest = await source_stream(env)
    last = h.parse_stream(stream)[-1]
    complete = stream[: last.offset]
    end = {
        "mid-header": last.offset + 7,
        "header-only": last.offset + h.REC_HEADER.size,
        "mid-image": last.offset + h.REC_HEADER.size + last.size // 2,
    }[cut]
    ref = await env.device(h.vf_config(SIZE))
    rf = await resuming(ref)
    await rf.write(complete)
    await ref.set_state(S.STOP)
    expect = await ref.digest()
    assert expect != digest  # the last image matters

    dst = await env.device(h.vf_config(SIZE))
    f = await resuming(dst)
    assert await f.write(stream[:end]) == end
    assert await dst.set_state(S.STOP) is None
    assert await dst.digest() == expect
    assert await dst.get_state() == S.STOP
    with h.raises_errno(errno.ENODEV):
        await f.write(stream[end:])


async def test_zero_length_fw_data_record_is_einval(mlx5: h.Factory) -> None:
    """§5.9 (derived from code): a zero-length FW_DATA record fails with EINVAL,
    with no image buffer yet (first record) and after a STOP_COPY_SIZE record
    sized one (the firmware refuses a LOAD of size 0)."""
    env = await mlx5("virtual")
    stream, _ = await source_stream(env)
    size_rec = stream[:24]
    for prefix in (b"", size_rec):
        dst = await env.device(h.vf_config(SIZE))
        f = await resuming(dst)
        with h.raises_errno(errno.EINVAL):
            await f.write(prefix + h.record(b"") + b"more")
        with h.raises_errno(errno.ENODEV):
            await f.write(b"x")


async def test_writes_after_the_file_ended(mlx5: h.Factory) -> None:
    """After RESUMING -> STOP (and after a reset) the resuming file is
    disabled: writes get ENODEV, release is harmless."""
    env = await mlx5()
    dst = await env.device()
    f = await resuming(dst)
    await dst.set_state(S.STOP)
    with h.raises_errno(errno.ENODEV):
        await f.write(b"abc")
    f2 = await dst.set_state(S.RESUMING)
    await dst.core.reset()
    assert await dst.get_state() == S.RUNNING
    with h.raises_errno(errno.ENODEV):
        await f2.write(b"abc")
    await f.release()
    await f2.release()
    with h.raises_errno(errno.ENODEV):
        await f2.write(b"abc")


@pytest.mark.parametrize("size", [4, 0])
async def test_short_stop_copy_size_record_is_accepted(mlx5: h.Factory, size: int) -> None:
    """§5.9 READ_HEADER_DATA: the STOP_COPY_SIZE value only pre-sizes the image
    buffer; the kernel (mlx5vf_resume_read_header_data) takes whatever
    record_size the record has (tag known, size <= 2^32-1), reads the le64
    from the header buffer's page and goes on: the stream still loads.
    (Regression: the driver used to fail such a record with EINVAL.)"""
    env = await mlx5("virtual")
    stream, digest = await source_stream(env)
    recs = h.parse_stream(stream)
    short = h.record((1 << 20).to_bytes(8, "little")[:size], tag=h.TAG_STOP_COPY_SIZE)
    variant = short + stream[recs[1].offset :]
    dst = await env.device(h.vf_config(SIZE))
    f = await resuming(dst)
    assert await f.write(variant) == len(variant)
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest

"""Whole migrations through the driver, source to destination, on the real
clock with a live workload (reference §5.7 "Typical source" / "Destination",
§3.3 REINIT), against both firmware adapters, outside and in chunk mode."""

from __future__ import annotations

import asyncio
import random

import pytest

from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, MigState
from fwemu.link.ifc import KiB, MiB
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(60)

REINIT = VFIO_PRECOPY_INFO_REINIT
CHUNK = 64 * KiB


async def run_source(
    env: h.Mlx5Env, src: h.Dev, *, v2: bool, rounds: int = 12, reconfigure_at: int = 3
) -> tuple[bytes, str, list[int]]:
    """PRE_COPY with GET_PRECOPY_INFO / read rounds and one reconfiguration,
    PRE_COPY_P2P, STOP_COPY, read to EOF, STOP.  Returns (stream, the stopped
    source's digest, the flags each PRE_COPY info call returned)."""
    if v2:
        await src.opt_in_v2()
    f = await src.set_state(S.PRE_COPY)
    stream = bytearray()
    flags_seen: list[int] = []
    for i in range(rounds):
        if i == reconfigure_at:
            await env.reconfigure(src, [("QP", 24 * KiB), ("MKEY", 8 * KiB)])
        info = await h.precopy_info(f, flags=0xA5A5A5A5)
        flags_seen.append(info.flags)
        if v2 and info.flags & REINIT:
            assert info.dirty_bytes == 0
            assert info.initial_bytes > 32 * KiB
        got = await h.read_available(f)
        stream += got
        await asyncio.sleep(0.005)  # the workload runs
    await src.set_state(S.PRE_COPY_P2P)
    info = await h.precopy_info(f, flags=0xA5A5A5A5)
    assert not (v2 and info.flags)  # no REINIT in PRE_COPY_P2P
    stream += await h.read_available(f)
    await src.set_state(S.STOP_COPY)
    stream += await h.read_to_eof(env, f)
    await src.set_state(S.STOP)
    vf = await src.vf()
    assert vf.initiator_suspended and vf.responder_suspended and not vf.tracking
    return bytes(stream), await src.digest(), flags_seen


async def run_destination(dst: h.Dev, stream: bytes, rng: random.Random) -> str:
    """STOP, RESUMING, the stream in random writes, STOP: the digest while the
    target is stopped; then RUNNING_P2P, RUNNING."""
    await dst.set_state(S.STOP)
    f = await dst.set_state(S.RESUMING)
    cuts = sorted(rng.randrange(len(stream)) for _ in range(50))
    await h.write_all(f, stream, cuts)
    await dst.set_state(S.STOP)
    digest = await dst.digest()
    await dst.set_state(S.RUNNING_P2P)
    await dst.set_state(S.RUNNING)
    vf = await dst.vf()
    assert not vf.initiator_suspended and not vf.responder_suspended
    return digest


@pytest.mark.parametrize("chunks", [False, True], ids=["whole", "chunks"])
async def test_full_migration_with_workload_and_reinit(mlx5_wide: h.Factory, chunks: bool) -> None:
    """A live migration through the driver: PRE_COPY with a workload and a
    reconfiguration (seen as REINIT with the v2 opt-in, §3.3), PRE_COPY_P2P,
    STOP_COPY, read to EOF, STOP; the destination loads the stream in random
    writes; the digests are equal while the target is stopped, and both VFs
    run again afterwards."""
    env = await mlx5_wide(max_chunk_size=CHUNK)
    cfg = h.vf_config(
        1 * MiB, dirty=8 * MiB, chunks=chunks, chunk_size=CHUNK, latency=0.001, seed=None
    )
    src, dst = await env.devices(2, cfg)
    stream, src_digest, flags = await run_source(env, src, v2=True)
    assert flags.count(REINIT) == 1
    assert all(fl in (0, REINIT) for fl in flags)
    assert flags.index(REINIT) == 3  # the call right after the reconfiguration
    assert src.mvdev.stats.reinits == 1

    recs = h.parse_stream(stream)
    assert recs[0].tag == h.TAG_STOP_COPY_SIZE
    assert all(r.tag == h.TAG_FW_DATA for r in recs[1:])
    stop_copy_saves = [c for c in src.cmds() if c.brief in (("SAVE", 1, 0), ("SAVE", 0, 0))]
    if chunks:
        assert len(stop_copy_saves) >= 2  # the final image came in pieces
        assert all(r.size <= CHUNK for r in recs[1:] if r.size > 0)
    else:
        assert len(stop_copy_saves) == 1

    dst_digest = await run_destination(dst, stream, random.Random(7))
    assert dst_digest == src_digest
    # The source can run (and migrate) again.
    await src.set_state(S.RUNNING)
    assert await src.get_state() == S.RUNNING


async def test_full_migration_v1_never_sees_reinit(mlx5_wide: h.Factory) -> None:
    """The same migration without the opt-in: the flags are echoed on every
    call (0xA5A5A5A5), no REINIT, and the result is the same: equal digests."""
    env = await mlx5_wide()
    src, dst = await env.devices(2, h.vf_config(512 * KiB, dirty=8 * MiB, latency=0.001))
    stream, src_digest, flags = await run_source(env, src, v2=False)
    assert flags == [0xA5A5A5A5] * len(flags)
    assert src.mvdev.stats.reinits == 0
    assert await run_destination(dst, stream, random.Random(8)) == src_digest


async def test_two_migrations_at_once_do_not_interfere(mlx5_wide: h.Factory) -> None:
    """Two VFs migrating concurrently over the one link (completions of both
    interleave on it): each destination ends equal to its own source."""
    env = await mlx5_wide()
    src1, src2, dst1, dst2 = await env.devices(4, h.vf_config(256 * KiB, dirty=4 * MiB))

    async def one(src: h.Dev, dst: h.Dev, seed: int) -> tuple[str, str]:
        stream, digest = (await run_source(env, src, v2=True, rounds=6))[:2]
        return digest, await run_destination(dst, stream, random.Random(seed))

    (a, b), (c, d) = await asyncio.gather(one(src1, dst1, 1), one(src2, dst2, 2))
    assert a == b and c == d and a != c

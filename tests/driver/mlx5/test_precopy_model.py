"""GET_PRECOPY_INFO against a model of §5.8, over random sequences of reads,
workload time, reconfigurations and info calls (seeded; virtual clock, so the
firmware's answers are exact).  The model is built from what the firmware did
(the SAVE completions the link recorded) and what the test read, never from the
driver's own counters; the migration must still end with equal digests."""

from __future__ import annotations

import errno
import random

import pytest

from driver.vfio.errors import VfioError
from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, MigState
from fwemu.link.ifc import KiB
from tests.support import mlx5 as h

S = MigState

pytestmark = pytest.mark.timeout(90)

REINIT = VFIO_PRECOPY_INFO_REINIT
ECHO = 0x5A5A0000  # bit 0 clear: an echo is never mistaken for REINIT


def queued_by_firmware(dev: h.Dev) -> int:
    """Bytes the saving stream holds so far: the size record plus a 16-byte
    header and the image of every SAVE that completed successfully."""
    return h.STOP_COPY_SIZE_RECORD + sum(
        16 + int(c.completion.actual_image_size)
        for c in dev.cmds()
        if c.name == "SAVE" and c.completion is not None and c.completion.status == 0
    )


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("seed", range(4))
async def test_precopy_info_follows_the_model(mlx5: h.Factory, seed: int, v2: bool) -> None:
    """§5.8 as merged: initial_bytes falls by what was read and is replaced on
    REINIT by queued + inc_length + 16; REINIT comes exactly on the first info
    call after a reconfiguration (v2 only); past the initial bytes dirty_bytes
    = queued + inc_length (+16 when a SAVE is issued, i.e. nothing queued and
    inc_length > 0); v1 echoes the flags.  At the end the stream loads to the
    source's digest."""
    rng = random.Random(seed)
    env = await mlx5("virtual")
    src, dst = await env.devices(2, h.vf_config(96 * KiB, dirty=1 << 20, reconfig_bytes=12 * KiB))
    if v2:
        await src.opt_in_v2()
    f = await src.set_state(S.PRE_COPY)
    await env.settle(src)

    stream = bytearray()
    model_initial: int | None = None  # None: no info call yet
    reconfigured = False
    reinits = 0
    for _ in range(60):
        op = rng.choice(["read", "read", "info", "info", "advance", "reconfigure", "settle"])
        if op == "read":
            n = rng.choice([1, 16, 100, 4096, 30_000, 1 << 20])
            try:
                got = await f.read(n, nonblock=True)
            except VfioError as e:
                assert e.errno == errno.ENOMSG
                got = b""
            stream += got
            if model_initial is not None:
                model_initial = max(0, model_initial - len(got))
        elif op == "advance":
            await env.advance(rng.choice([0.0, 0.005, 0.02]))
        elif op == "reconfigure":
            await env.reconfigure(src)
            reconfigured = True
        elif op == "settle":
            await env.settle(src)
        else:
            await env.settle(src)  # the ioctl would wait for the SAVE in flight anyway
            queued = queued_by_firmware(src) - len(stream)
            mark = src.mark()
            info = await h.precopy_info(f, flags=ECHO)
            [q] = [c for c in src.cmds(mark) if c.name == "QUERY"]
            inc = q.result.required_umem_size
            saves = [c.brief for c in src.cmds(mark) if c.name == "SAVE"]
            if v2 and reconfigured:
                reinits += 1
                assert info.flags == REINIT
                assert (info.initial_bytes, info.dirty_bytes) == (queued + inc + 16, 0)
                assert saves == [("SAVE", 1, 1)]
                model_initial = info.initial_bytes
            else:
                assert info.flags == (0 if v2 else ECHO)
                if model_initial is None:
                    model_initial = queued  # the first call: all queued is initial
                if model_initial > 0:
                    assert info.initial_bytes == model_initial
                    assert saves == []
                else:
                    extra = 16 if queued == 0 and inc > 0 else 0
                    assert info.dirty_bytes == queued + inc + extra
                    assert saves == ([("SAVE", 1, 1)] if extra else [])
            reconfigured = False
    assert src.mvdev.stats.reinits == reinits

    await env.settle(src)
    await src.set_state(S.PRE_COPY_P2P)
    await src.set_state(S.STOP_COPY)
    stream += await h.read_to_eof(env, f)
    await src.set_state(S.STOP)
    assert sum(16 + r.size for r in h.parse_stream(bytes(stream))) == len(stream)
    digest = await src.digest()
    await dst.set_state(S.STOP)
    rf = await dst.set_state(S.RESUMING)
    await h.write_all(rf, bytes(stream), [rng.randrange(len(stream)) for _ in range(20)])
    await dst.set_state(S.STOP)
    assert await dst.digest() == digest

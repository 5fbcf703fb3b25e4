"""Fuzzing the resume parser (mlx5vf_resume_write, issue 11 item 5): mutated
valid streams and random bytes written to a RESUMING fd of a small VF.  Every
refusal is a VfioError with an errno, nothing else escapes, no write hangs,
and afterwards the device resets and loads a real stream.

A few hundred examples in CI; VFIO_FUZZ_EXAMPLES=N runs N (a long run: add -s to
see the count of inputs, --hypothesis-show-statistics for the timing)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver.registry import DeviceRegistry
from driver.vfio.errors import VfioError
from driver.vfio.uapi import MigState
from fwemu.link.ifc import KiB
from fwemu.link.inproc import InProcessLink
from fwemu.model import Firmware, VirtualClock
from tests.support import mlx5 as h

S = MigState
EXAMPLES = int(os.environ.get("VFIO_FUZZ_EXAMPLES", "200"))
SIZE = 24 * KiB
BUDGET = 1 << 20  # small, so that huge declared records meet it, not the machine
WRITE_TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(max(120, EXAMPLES))


async def _env(seed: int) -> tuple[h.Mlx5Env, InProcessLink]:
    fw = Firmware(VirtualClock(), seed=seed)
    link = InProcessLink(fw)
    return h.Mlx5Env("inproc", fw, link, DeviceRegistry(link, buffer_budget=BUDGET), True), link


async def _produce() -> tuple[bytes, str]:
    env, link = await _env(11)
    try:
        src = await env.device(h.vf_config(SIZE, dirty=1 << 20))
        return await h.pre_copy_stream(env, src)
    finally:
        await env.close()
        await link.close()


@functools.cache
def valid_stream() -> tuple[bytes, str]:
    return asyncio.run(_produce())


def _header_edit(stream: bytes, at: int, size: int, flags: int, tag: int) -> bytes:
    """The record header at `at` replaced."""
    return stream[:at] + h.REC_HEADER.pack(size, flags, tag) + stream[at + h.REC_HEADER.size :]


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    stream, _ = valid_stream()
    kind = draw(st.sampled_from(["random", "flips", "header", "truncated", "spliced"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "truncated":
        return stream[: draw(st.integers(0, len(stream)))]
    if kind == "spliced":
        a = draw(st.integers(0, len(stream)))
        b = draw(st.integers(0, len(stream)))
        return stream[:a] + stream[b:]
    if kind == "header":
        at = draw(st.sampled_from([r.offset for r in h.parse_stream(stream)]))
        size = draw(
            st.one_of(
                st.integers(0, 64 * KiB),
                st.integers(0, (1 << 32) - 1),
                st.integers(0, (1 << 64) - 1),
            )
        )
        flags = draw(st.sampled_from([0, 1, 0xFFFFFFFF]))
        tag = draw(st.sampled_from([0, 1, 2, 0xFFFFFFFF]))
        return _header_edit(stream, at, size, flags, tag)
    out = bytearray(stream)
    for pos in draw(st.lists(st.integers(0, len(stream) - 1), min_size=1, max_size=8)):
        out[pos] ^= draw(st.integers(1, 255))
    return bytes(out)


class _Rig:
    """One firmware, registry and open destination device for every example,
    on one event loop: each example starts from wherever the last one left the
    device (a stronger test than a fresh one, and fast enough for a long run)."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.env, self.link = self.runner.run(_env(99))
        self.dst = self.runner.run(self.env.device(h.vf_config(SIZE)))
        self.inputs = 0

    def run(self, data: bytes, cuts: list[int]) -> None:
        self.runner.run(self._run(data, cuts))
        self.inputs += 1

    async def _run(self, data: bytes, cuts: list[int]) -> None:
        real, digest = valid_stream()
        env, dst = self.env, self.dst
        await asyncio.wait_for(env.drive(dst.core.reset()), WRITE_TIMEOUT)
        f = await dst.walk(S.STOP, S.RESUMING)
        bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
        for a, b in itertools.pairwise(bounds):
            try:
                n = await asyncio.wait_for(env.drive(f.write(data[a:b])), WRITE_TIMEOUT)
            except VfioError as e:
                assert e.errno and e.errno > 0, e
                continue
            assert n == b - a
        # Whatever the stream did, the device resets and then migrates.
        await asyncio.wait_for(env.drive(dst.core.reset()), WRITE_TIMEOUT)
        f2 = await dst.walk(S.STOP, S.RESUMING)
        assert await f2.write(real) == len(real)
        await dst.set_state(S.STOP)
        assert await dst.digest() == digest
        assert env.registry.budget.held == {}

    def close(self) -> None:
        async def _close() -> None:
            await self.env.close()
            await self.link.close()

        self.runner.run(_close())
        self.runner.close()


@pytest.fixture(scope="module")
def rig() -> Iterator[_Rig]:
    r = _Rig()
    yield r
    print(f"\nresume fuzz: {r.inputs} inputs, every one answered or refused with an errno")
    r.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=hostile(), cuts=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_hostile_streams_are_refused_with_an_errno_and_the_device_recovers(
    rig: _Rig, data: bytes, cuts: list[int]
) -> None:
    rig.run(data, cuts)

"""The precopy's reads on a ReadIntoStream kept open (ReadLane): one call
for reads in a row, the same bytes as ReadInto would give; a failed read
(ENOMSG: nothing now) ends that call, half-closed to its OK status, never
cancelled, and the next read opens another; `close` ends the last."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.support.vfioclient_migration import InProcessRig, in_process_rig
from vfioclient import VfioClientError
from vfioclient.client import ReadIntoCall
from vfioclient.migration.lane import ReadLane
from vfioclient.uapi import MigState as S
from vfioclient.usermem import SharedSegment

pytestmark = pytest.mark.grpc
BUF = 1 << 20


@pytest.fixture(name="rig")
async def rig_fixture() -> AsyncIterator[InProcessRig]:
    async with in_process_rig() as rig:
        yield rig


async def test_reads_share_a_call_and_a_failure_ends_it_ok(rig: InProcessRig) -> None:
    calls: list[ReadIntoCall] = []
    opened = rig.src.read_into_stream

    def read_into_stream(fd: int) -> ReadIntoCall:
        call = opened(fd)
        calls.append(call)
        return call

    rig.src.read_into_stream = read_into_stream  # type: ignore[method-assign]
    pair, _, _ = await rig.pair(size=2 << 20)
    c = rig.src
    seg = SharedSegment.create(BUF)
    try:
        base = await seg.attach(c)
        assert base is not None
        data_fd = await c.set_state(pair.source_fd, S.PRE_COPY)
        assert data_fd is not None
        initial = (await c.precopy_info(data_fd)).initial_bytes
        lane = ReadLane(c, data_fd)
        got = 0
        with pytest.raises(VfioClientError) as info:
            while True:
                got += await lane.read_into(base, BUF)
        assert info.value.errno == errno.ENOMSG  # empty for now, as read(2) says
        assert got == initial > BUF  # several reads ...
        assert len(calls) == 1  # ... on one call
        with pytest.raises(VfioClientError) as info:
            await lane.read_into(base, BUF)  # a new call, not ECANCELED
        assert info.value.errno == errno.ENOMSG and len(calls) == 2
        await lane.close()
        for call in calls:
            inner: Any = call._call
            assert await inner.code() == grpc.StatusCode.OK
    finally:
        await seg.close()

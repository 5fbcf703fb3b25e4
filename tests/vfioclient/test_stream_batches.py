"""ReadIntoCall / WriteFromCall.submit_many: several read(2)s or write(2)s in
one ReadIntoStream / WriteFromStream request; `result` still takes their
counts one at a time, in order, a failed one raising where it stands and
those after it ECANCELED."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator

import pytest

from tests.support.vfioclient_migration import InProcessRig, in_process_rig
from vfioclient import VfioClient, VfioClientError
from vfioclient.calls import MAX_SPANS, read_into_request, write_from_request
from vfioclient.uapi import MigState as S
from vfioclient.usermem import SharedSegment

pytestmark = pytest.mark.grpc
PIECE = 64 << 10


@pytest.fixture(name="rig")
async def rig_fixture() -> AsyncIterator[InProcessRig]:
    async with in_process_rig() as rig:
        yield rig


@contextlib.asynccontextmanager
async def stop_copy(rig: InProcessRig, slots: int) -> AsyncIterator[tuple[VfioClient, int, int]]:
    """A source in STOP_COPY and a segment of `slots` pieces mapped in its
    client: (client, the segment's address, the saving fd)."""
    pair, _, _ = await rig.pair(size=2 << 20)
    c = rig.src
    seg = SharedSegment.create(slots * PIECE)
    try:
        base = await seg.attach(c)
        assert base is not None
        await c.set_state(pair.source_fd, S.STOP)
        saving = await c.set_state(pair.source_fd, S.STOP_COPY)
        assert saving is not None
        yield c, base, saving
    finally:
        await seg.close()


async def test_submit_many_counts_come_one_by_one_in_order(rig: InProcessRig) -> None:
    async with stop_copy(rig, 16) as (c, base, saving):
        call = c.read_into_stream(saving)
        await call.submit_many([(base + i * PIECE, PIECE) for i in range(8)])
        await call.submit(base + 8 * PIECE, PIECE)
        assert call.pending == 9
        counts = [await call.result() for _ in range(9)]
        assert call.pending == 0
        assert counts == [PIECE] * 9  # the stream is longer than that
        await call.close_writing()
        assert await call.result() is None  # the call ended OK


async def test_a_failure_in_a_batch_raises_at_its_place(rig: InProcessRig) -> None:
    async with stop_copy(rig, 4) as (c, base, saving):
        call = c.read_into_stream(saving)
        await call.submit_many([(base, 100), (8, 100), (base, 100)])
        assert await call.result() == 100
        for code in (errno.EFAULT, errno.ECANCELED):
            with pytest.raises(VfioClientError) as info:
                await call.result()
            assert info.value.errno == code
        await call.close_writing()
        assert await call.result() is None  # the call ended OK


def test_a_request_carries_at_most_max_spans_operations() -> None:
    spans = [(4096 * i, 10) for i in range(MAX_SPANS)]
    assert len(read_into_request(3, 0, 10, then=spans[1:]).then) == MAX_SPANS - 1
    assert len(write_from_request(3, 0, 10, then=spans[1:]).then) == MAX_SPANS - 1
    with pytest.raises(ValueError, match="at most 64"):
        read_into_request(3, 0, 10, then=spans)
    with pytest.raises(ValueError, match="at most 64"):
        write_from_request(3, 0, 10, then=spans)


async def test_submit_many_of_nothing_is_a_value_error(rig: InProcessRig) -> None:
    async with stop_copy(rig, 1) as (c, _, saving):
        for call in (c.read_into_stream(saving), c.write_from_stream(saving)):
            with pytest.raises(ValueError, match="at least one"):
                await call.submit_many([])
            await call.close_writing()
            assert await call.result() is None  # nothing was sent: the call ends OK

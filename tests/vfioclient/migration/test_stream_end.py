"""How a migration ends its stop-copy ReadIntoStream: as the driver ends it
(no more requests, the reads ahead answered 0, status OK), never by
cancelling it.  A cancelled call leaks native memory in the driver's grpc.aio
(grpc/grpc#43360): about 200 bytes a migration, which benchmarks/soak.py saw
as RSS growth over 20,000 migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.support.vfioclient_migration import InProcessRig, in_process_rig, options
from vfioclient.client import ReadIntoCall
from vfioclient.migration import migrate

pytestmark = pytest.mark.grpc


@pytest.fixture(name="rig")
async def rig_fixture() -> AsyncIterator[InProcessRig]:
    async with in_process_rig() as rig:
        yield rig


async def test_stop_copy_read_stream_ends_ok_not_cancelled(rig: InProcessRig) -> None:
    calls: list[ReadIntoCall] = []
    opened = rig.src.read_into_stream

    def read_into_stream(fd: int) -> ReadIntoCall:
        call = opened(fd)
        calls.append(call)
        return call

    rig.src.read_into_stream = read_into_stream  # type: ignore[method-assign]
    pair, s, d = await rig.pair()
    o = options(data_path="shm")
    o.on_destinations_loaded = rig.digest_hook([(s, d)]).on_destinations_loaded
    report = await migrate([pair], o)
    assert report.status == "completed"
    assert rig.digests[0][0] == rig.digests[0][1]
    assert calls, "the stop-copy read went through ReadIntoStream"
    inner: Any = calls[-1]._call
    assert await inner.code() == grpc.StatusCode.OK

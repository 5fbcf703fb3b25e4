"""The client table forgets clients that hold nothing (issue 11, item 4):
a client with no fd, no Session and no mapping is dropped once idle for
`client_idle` seconds (one-shot ids do not grow the driver for good); one
that holds anything stays."""

from __future__ import annotations

import errno

import pytest

from driver.service.process import CLIENT_IDLE, DeviceFd, Process, reap_idle
from tests.support.driver_service import DriverUnderTest, VfioClient, errno_of
from tests.support.vfio_fakes import raises_errno

pytestmark = pytest.mark.grpc


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_idle_one_shot_clients_are_forgotten_busy_ones_kept(
    inproc: DriverUnderTest,
) -> None:
    servicer = inproc.server.servicer
    clock = FakeClock()
    servicer.clock = clock
    assert servicer.client_idle == CLIENT_IDLE == 300.0
    (vf,) = await inproc.create_vfs()
    async with (
        await VfioClient.connect(inproc.target, "with-session") as sess,
        await VfioClient.connect(inproc.target, "with-fd", session=False) as holder,
    ):
        await holder.open_device(vf.name)
        for i in range(40):
            async with VfioClient(inproc.target, f"one-shot-{i}") as c:
                assert await errno_of(c.close(99)) == errno.EBADF
        assert len(servicer.processes) == 42
        clock.now += CLIENT_IDLE - 1  # not idle long enough yet
        async with VfioClient(inproc.target, "late") as late:
            await errno_of(late.close(99))
        assert len(servicer.processes) == 43
        clock.now += CLIENT_IDLE  # every one-shot id and "late" idle past the limit
        async with VfioClient(inproc.target, "trigger") as t:
            await errno_of(t.close(99))
        assert {c for _, c in servicer.processes} == {"with-session", "with-fd", "trigger"}
        # A forgotten client that comes back starts afresh.
        async with VfioClient(inproc.target, "one-shot-3") as again:
            assert await errno_of(again.close(3)) == errno.EBADF
        assert await sess.open_device(vf.name) == 3


def test_a_reaped_table_takes_no_fd() -> None:
    """A call still running for a client when it is forgotten cannot put an
    fd in the dropped table: EBADF (the caller releases what it opened)."""
    procs = {"a": Process("a"), "b": Process("b")}
    procs["b"].sessions = 1
    assert reap_idle(procs, now=10.0, idle_for=5.0) == 1
    assert set(procs) == {"b"}
    gone = Process("a")
    procs2 = {"a": gone}
    reap_idle(procs2, now=10.0, idle_for=5.0)
    with raises_errno(errno.EBADF):
        gone.install(DeviceFd(object()))  # type: ignore[arg-type]

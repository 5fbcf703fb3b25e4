"""Identity is the authenticated principal (issue 12, item 2).

Under mutual TLS the principal of a call is its client certificate's
identity, and `x-vfio-client` only names a process within it: a client that
sends another principal's client id gets a process of its own, so it cannot
read, write, close or reset the victim's fds, and a Session it opens under
that id and cancels closes nothing of the victim's, whose migration goes on
to equal digests.  Without client certificates every caller is the one
principal ANONYMOUS and the same id is the same process, as before."""

from __future__ import annotations

import errno

import pytest

from driver.service.process import FIRST_FD
from tests.driver.service.tenancy import (
    WORKLOAD,
    A,
    B,
    Tenancy,
    finish_migration,
    start_migration,
)
from tests.support import tls_mode
from tests.support.driver_service import DriverUnderTest, VfioClient, errno_of, eventually

pytestmark = pytest.mark.grpc


async def test_a_stolen_client_id_reaches_nothing_of_the_victims(tenancy: Tenancy) -> None:
    t = tenancy
    src, dst = await t.create_vfs(2, **WORKLOAD)
    victim = await t.client(A, "orchestrator")
    m = await start_migration(victim, src, dst)
    thief = await t.client(B, "orchestrator")  # the victim's id, its own certificate
    for fd in (m.sfd, m.dfd, m.saving, m.resuming):
        assert await errno_of(thief.close(fd)) == errno.EBADF
    assert await errno_of(thief.read(m.saving, 4096)) == errno.EBADF
    assert await errno_of(thief.write(m.resuming, [b"\0" * 16])) == errno.EBADF
    assert await errno_of(thief.reset(m.sfd)) == errno.EBADF
    assert await errno_of(thief.precopy_info(m.saving)) == errno.EBADF
    assert await errno_of(thief.get_state(m.sfd)) == errno.EBADF

    # Two processes by that id, one per principal.
    procs = t.server.servicer.processes
    mine, theirs = (t.principal(A), "orchestrator"), (t.principal(B), "orchestrator")
    assert procs[mine] is not procs[theirs] and len(procs[mine].fds) == 4

    # The thief's Session under the victim's id ends: its own process goes.
    await thief.end_session()
    assert await eventually(lambda: _gone(t, theirs))
    assert len(procs[mine].fds) == 4
    await finish_migration(m, t)


async def _gone(t: Tenancy, key: tuple[str, str]) -> bool:
    return key not in t.server.servicer.processes


async def test_a_principals_clients_are_its_own_processes_with_their_own_fd_numbers(
    tenancy: Tenancy,
) -> None:
    """Each principal's process numbers its fds from FIRST_FD: the numbers
    say nothing of other principals' fds."""
    t = tenancy
    va, vb = await t.create_vfs(2)
    a = await t.client(A, "same")
    b = await t.client(B, "same")
    assert await a.open_device(va.name) == FIRST_FD
    assert await b.open_device(vb.name) == FIRST_FD


async def test_without_client_certificates_the_same_id_is_the_same_process(
    inproc: DriverUnderTest,
) -> None:
    """Loopback development, no TLS: one principal, so two channels with one
    x-vfio-client share a descriptor table, as before issue 12."""
    (vf,) = await inproc.create_vfs()
    async with (
        await VfioClient.connect(inproc.target, "dev") as first,
        VfioClient(inproc.target, "dev") as second,
    ):
        fd = await first.open_device(vf.name)
        assert set(inproc.server.servicer.processes) == {(tls_mode.client_principal(), "dev")}
        await second.close(fd)
        assert await errno_of(first.close(fd)) == errno.EBADF

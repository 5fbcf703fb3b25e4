"""File descriptors and client lifetimes: each client (x-vfio-client) has a
descriptor table of its own, as a process has; fds are numbered as the kernel
numbers them; the wrong kind of fd gets the errno the kernel gives; and when a
client's Session stream ends its fds are closed as at process exit."""

from __future__ import annotations

import asyncio
import errno

import pytest

from driver.service.process import FIRST_FD
from driver.vfio.uapi import VFIO_PRECOPY_INFO_REINIT, Feature, MigState
from tests.support import tls_mode
from tests.support.driver_service import (
    GET,
    SET,
    DriverUnderTest,
    VfioCallError,
    VfioClient,
    errno_of,
    eventually,
)

S = MigState
pytestmark = pytest.mark.grpc

V2_OPT_IN = SET | Feature.MIG_PRECOPY_INFOv2
ECHO = 0xA5A50000  # flags a v1 driver echoes back (no bit a driver sets)


async def precopy_flags_echo(client: VfioClient, fd: int) -> int:
    """Go to PRE_COPY and ask GET_PRECOPY_INFO with flags = ECHO: ECHO comes
    back without the v2 opt-in, 0 (or REINIT) with it.  Back to RUNNING after."""
    dfd = await client.set_state(fd, S.PRE_COPY)
    flags = (await client.precopy_info(dfd, flags=ECHO)).flags
    await client.close(dfd)
    await client.set_state(fd, S.RUNNING)
    return flags


async def test_new_fds_take_the_lowest_free_number(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """get_unused_fd_flags: the lowest free fd, from 3 (0-2 are stdio); device
    and data fds share one table."""
    a, b = await drv.create_vfs(2)
    fds = [await client.open_device(a.name), await client.open_device(b.name)]
    assert fds == [FIRST_FD, FIRST_FD + 1] == [3, 4]
    dfd = await client.set_state(fds[1], S.PRE_COPY)
    assert dfd == 5
    await client.close(fds[0])
    assert await client.open_device(a.name) == 3
    await client.close(dfd)
    await client.set_state(fds[1], S.RUNNING)
    assert await client.set_state(fds[1], S.PRE_COPY) == 5


async def test_close_of_an_fd_that_is_not_open_is_ebadf(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """close(2) twice: the second is EBADF; so is any fd never handed out."""
    _, fd = await drv.open_vf(client)
    await client.close(fd)
    assert await errno_of(client.close(fd)) == errno.EBADF
    assert await errno_of(client.close(-1)) == errno.EBADF


async def test_each_kind_of_fd_refuses_the_other_kinds_calls(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """Device fd: read -> EINVAL, GET_PRECOPY_INFO -> ENOTTY (an ioctl it does
    not have).  Data fd: VFIO_DEVICE_FEATURE / VFIO_DEVICE_RESET -> ENOTTY (the
    file's ioctl knows only GET_PRECOPY_INFO).  Saving fd: write -> EBADF (it is
    read-only).  Resuming fd: read -> EBADF, GET_PRECOPY_INFO -> ENOTTY."""
    src, dst = await drv.create_vfs(2)
    fd = await client.open_device(src.name)
    assert await errno_of(client.read(fd, 10)) == errno.EINVAL
    assert await errno_of(anext(client.read_stream(fd))) == errno.EINVAL
    assert await errno_of(client.write(fd, [b"x"])) == errno.EINVAL
    assert await errno_of(client.precopy_info(fd)) == errno.ENOTTY

    saving = await client.set_state(fd, S.PRE_COPY)
    migration = GET | Feature.MIGRATION
    assert await errno_of(client.device_feature(saving, 16, migration, bytes(8))) == errno.ENOTTY
    assert await errno_of(client.reset(saving)) == errno.ENOTTY
    assert await errno_of(client.write(saving, [b"x"])) == errno.EBADF

    dfd = await client.open_device(dst.name)
    await client.set_state(dfd, S.STOP)
    resuming = await client.set_state(dfd, S.RESUMING)
    assert await errno_of(client.read(resuming, 10)) == errno.EBADF
    assert await errno_of(client.precopy_info(resuming)) == errno.ENOTTY


async def test_fds_belong_to_their_client(drv: DriverUnderTest, client: VfioClient) -> None:
    """Descriptor tables are per client: another x-vfio-client numbers its own
    fds from 3 and cannot use (or close) this client's."""
    a, b = await drv.create_vfs(2)
    fd = await client.open_device(a.name)
    dfd = await client.set_state(fd, S.PRE_COPY)
    async with await VfioClient.connect(drv.target) as other:
        assert await errno_of(other.close(fd)) == errno.EBADF
        assert await errno_of(other.read(dfd, 10)) == errno.EBADF
        assert await errno_of(other.get_state(fd)) == errno.EBADF
        assert await other.open_device(b.name) == fd  # its own 3
        assert await other.get_state(fd) == S.RUNNING  # b, not a
    assert await client.get_state(fd) == S.PRE_COPY
    assert len(await client.read(dfd, 24)) == 24


async def test_the_same_client_id_on_another_channel_is_the_same_client(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """The client is named by x-vfio-client, not by its connection."""
    vf, fd = await drv.open_vf(client)
    async with VfioClient(drv.target, client.client_id) as again:
        assert await again.get_state(fd) == S.RUNNING
        assert await again.open_device(vf.name) == fd + 1


async def test_a_session_end_closes_the_clients_devices_and_files(drv: DriverUnderTest) -> None:
    """A client whose Session stream ends (its channel closed) is gone: its
    data fds and device fds are closed (open_count back to 0), and the last
    close forgets the MIG_PRECOPY_INFOv2 opt-in (vfio_df_device_last_close)."""
    (vf,) = await drv.create_vfs()
    gone = await VfioClient.connect(drv.target)
    fd = await gone.open_device(vf.name)
    await gone.open_device(vf.name)  # a second fd on the same device
    await gone.device_feature(fd, 8, V2_OPT_IN)
    dfd = await gone.set_state(fd, S.PRE_COPY)
    assert (await gone.precopy_info(dfd, flags=ECHO)).flags & ~VFIO_PRECOPY_INFO_REINIT == 0
    async with await VfioClient.connect(drv.target) as watcher:
        assert (await watcher.device_info(vf.name)).open_count == 2
        await gone.close_channel()

        async def closed() -> bool:
            return (await watcher.device_info(vf.name)).open_count == 0

        assert await eventually(closed)
        # The device is as new: RUNNING, no saving file left, no v2 opt-in.
        fd = await watcher.open_device(vf.name)
        assert await watcher.get_state(fd) == S.RUNNING
        assert await precopy_flags_echo(watcher, fd) == ECHO


async def test_the_opt_in_stays_while_another_client_has_the_device_open(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """precopy_info_v2 is device-wide and cleared only at the LAST close: one
    client going away does not clear it while another still has the device."""
    vf, fd = await drv.open_vf(client)
    leaving = await VfioClient.connect(drv.target)
    lfd = await leaving.open_device(vf.name)
    await leaving.device_feature(lfd, 8, V2_OPT_IN)
    await leaving.close_channel()

    async def left() -> bool:
        return (await client.device_info(vf.name)).open_count == 1

    assert await eventually(left)
    assert await precopy_flags_echo(client, fd) & ~VFIO_PRECOPY_INFO_REINIT == 0
    await client.close(fd)
    fd = await client.open_device(vf.name)
    assert await precopy_flags_echo(client, fd) == ECHO


async def test_fds_close_only_when_the_last_session_of_a_client_ends(
    drv: DriverUnderTest,
) -> None:
    """A client may hold several Session streams (say, one per channel): it is
    gone when the last one ends."""
    (vf,) = await drv.create_vfs()
    first = await VfioClient.connect(drv.target)
    second = await VfioClient.connect(drv.target, first.client_id)
    fd = await first.open_device(vf.name)
    await first.close_channel()
    async with await VfioClient.connect(drv.target) as watcher:
        # Give the server time to see the first session end.
        assert not await eventually(lambda: _open_count_is(watcher, vf.name, 0), timeout=0.3)
        assert await second.get_state(fd) == S.RUNNING
        await second.end_session()
        assert await eventually(lambda: _open_count_is(watcher, vf.name, 0))
    await second.close_channel()


async def _open_count_is(client: VfioClient, name: str, n: int) -> bool:
    return (await client.device_info(name)).open_count == n


async def test_a_client_without_a_session_keeps_its_fds(drv: DriverUnderTest) -> None:
    """Without a Session stream nothing tells the server the client is gone:
    its fds stay open (and usable from a new channel) until it closes them."""
    (vf,) = await drv.create_vfs()
    async with await VfioClient.connect(drv.target, session=False) as sessionless:
        fd = await sessionless.open_device(vf.name)
        client_id = sessionless.client_id
    async with await VfioClient.connect(drv.target, client_id, session=False) as again:
        assert not await eventually(lambda: _open_count_is(again, vf.name, 0), timeout=0.2)
        await again.close(fd)
        assert await _open_count_is(again, vf.name, 0)


async def test_the_session_names_the_client(drv: DriverUnderTest) -> None:
    """The Session's first event names the client id the server files fds under."""
    async with VfioClient(drv.target, "orchestrator-7") as c:
        assert await c.open_session() == "orchestrator-7"


async def test_a_stopping_server_ends_sessions_and_closes_every_fd(
    inproc: DriverUnderTest,
) -> None:
    """Stopping the server ends Session streams at once (OK, not after the
    grace period) and closes what every client still had open."""
    (vf,) = await inproc.create_vfs()
    client = await VfioClient.connect(inproc.target)
    fd = await client.open_device(vf.name)
    await client.set_state(fd, S.PRE_COPY)
    core = inproc.registered(vf).core
    assert core.open_count == 1
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await inproc.server.stop(grace=10)
    assert loop.time() - t0 < 5
    assert core.open_count == 0 and inproc.registered(vf).mvdev.saving_migf is None
    await client.close_channel()


async def test_an_open_still_in_flight_when_the_client_goes_away_leaves_nothing_open(
    inproc: DriverUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that finishes after its client's Session ended has no descriptor
    table to put its fd in: what it opened is closed again (no device stays
    open for a client that is gone), and the client id, if it comes back,
    starts with an empty table."""
    (vf,) = await inproc.create_vfs()
    mvdev = inproc.registered(vf).mvdev
    entered, release = asyncio.Event(), asyncio.Event()
    original = type(mvdev).open_device

    async def slow_open(self: object) -> None:
        entered.set()
        await release.wait()
        await original(mvdev)

    monkeypatch.setattr(mvdev, "open_device", slow_open.__get__(mvdev))
    gone = await VfioClient.connect(inproc.target)
    # The same client on a second channel (no session) makes the slow call.
    caller = VfioClient(inproc.target, gone.client_id)
    opening = asyncio.ensure_future(caller.open_device(vf.name))
    await entered.wait()
    await gone.close_channel()

    async def exited() -> bool:  # the server saw the session end: the client exited
        return (tls_mode.client_principal(), gone.client_id) not in inproc.server.servicer.processes

    assert await eventually(exited)
    release.set()
    with pytest.raises(VfioCallError) as e:
        await opening
    assert e.value.errno == errno.EBADF
    assert await _open_count_is(caller, vf.name, 0)
    assert await errno_of(caller.close(3)) == errno.EBADF  # a fresh, empty table
    await caller.close_channel()

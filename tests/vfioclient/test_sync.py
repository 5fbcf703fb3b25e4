"""SyncVfioClient: blocking calls over a private event loop thread."""

from __future__ import annotations

import errno
import threading

import pytest

from driver.shards import pci_name
from driver.vfio.uapi import VFIO_MIGRATION_STOP_COPY, MigState
from tests.support.vfioctl_driver import Driver
from vfioclient import VfioClientError
from vfioclient.sync import SyncVfioClient
from vfioclient.usermem import SharedSegment

pytestmark = pytest.mark.grpc


def test_save_and_load_between_two_clients(driver: Driver) -> None:
    with (
        SyncVfioClient.connect(driver.target) as src,
        SyncVfioClient.connect(driver.target) as dst,
    ):
        names = [d.name for d in src.list_devices()]
        assert names == [pci_name(1), pci_name(2), pci_name(3)]
        sfd = src.open_device(pci_name(1))
        dfd = dst.open_device(pci_name(2))
        assert src.migration_flags(sfd) & VFIO_MIGRATION_STOP_COPY
        assert src.get_state(sfd) is MigState.RUNNING
        assert src.data_size(sfd) > 0
        assert src.set_state(sfd, MigState.STOP) is None
        data_fd = src.set_state(sfd, MigState.STOP_COPY)
        assert data_fd is not None
        image = src.read_all(data_fd, chunk_size=64 << 10)
        assert len(image) > 0
        src.set_state(sfd, MigState.STOP)

        resume_fd = dst.set_state(dfd, MigState.RESUMING)
        assert resume_fd is not None
        chunks = [image[i : i + 50_000] for i in range(0, len(image), 50_000)]
        assert dst.write(resume_fd, chunks) == len(image)
        dst.set_state(dfd, MigState.STOP)
        assert dst.get_state(dfd) is MigState.STOP
    # Both clients closed (their loops too): the digests over a fresh loop.
    a, b = driver.digests(1, 2)
    assert a == b


def test_save_and_load_through_user_memory(driver: Driver) -> None:
    """The same through one segment both clients map: read_into to the end
    (0), write_from of each piece; the digests agree."""
    seg = SharedSegment.create(8 << 20)
    try:
        with (
            SyncVfioClient.connect(driver.target) as src,
            SyncVfioClient.connect(driver.target) as dst,
        ):
            a = src.map_user_memory(seg.segment.name, len(seg))
            b = dst.map_user_memory(seg.segment.name, len(seg))
            sfd, dfd = src.open_device(pci_name(2)), dst.open_device(pci_name(3))
            src.set_state(sfd, MigState.STOP)
            data_fd = src.set_state(sfd, MigState.STOP_COPY)
            resume_fd = dst.set_state(dfd, MigState.RESUMING)
            assert data_fd is not None and resume_fd is not None
            moved = 0
            while n := src.read_into(data_fd, a, 1 << 20):
                assert dst.write_from(resume_fd, b, n) == n
                moved += n
            assert moved > 0
            with pytest.raises(VfioClientError) as e:
                src.read_into(data_fd, a + len(seg) - 1, 2)
            assert e.value.errno == errno.EFAULT
            dst.set_state(dfd, MigState.STOP)
            src.unmap_user_memory(a)
        assert driver.digests(2) == driver.digests(3)
    finally:
        seg.seal()
        seg.segment.close()


def test_precopy_read_stream_ends_with_enomsg(driver: Driver) -> None:
    with SyncVfioClient.connect(driver.target) as c:
        fd = c.open_device(pci_name(1))
        assert c.enable_precopy_info_v2(fd)
        data_fd = c.set_state(fd, MigState.PRE_COPY)
        assert data_fd is not None
        info = c.precopy_info(data_fd)
        assert info.initial_bytes > 0 and not info.reinit
        got = 0
        with pytest.raises(VfioClientError) as e:
            for chunk in c.read_stream(data_fd, chunk_size=32 << 10):
                got += len(chunk)
        assert e.value.errno == errno.ENOMSG
        assert got >= info.initial_bytes
        c.set_state(fd, MigState.RUNNING)


def test_errors_carry_the_kernel_errno(driver: Driver) -> None:
    with SyncVfioClient.connect(driver.target) as c:
        with pytest.raises(VfioClientError) as e:
            c.open_device("0000:99:00.0")
        assert e.value.errno == errno.ENOENT
        assert isinstance(e.value, OSError)
        fd = c.open_device(pci_name(1))
        with pytest.raises(VfioClientError) as e:
            c.read(fd, 10)  # a device fd is not a data fd
        assert e.value.errno == errno.EINVAL
        c.close(fd)
        with pytest.raises(VfioClientError) as e:
            c.close(fd)
        assert e.value.errno == errno.EBADF


def test_unreachable_and_closed() -> None:
    before = threading.active_count()
    with pytest.raises(VfioClientError) as e:
        SyncVfioClient.connect("127.0.0.1:1", timeout=2.0)
    assert e.value.errno == errno.ENOTCONN
    assert threading.active_count() <= before  # the loop thread ended


def test_close_client_stops_the_loop_thread(driver: Driver) -> None:
    c = SyncVfioClient.connect(driver.target)
    thread = c._runner._thread
    assert thread.is_alive()
    c.close_client()
    assert not thread.is_alive()
    with pytest.raises(VfioClientError):
        c.list_devices()

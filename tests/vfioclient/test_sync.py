"""SyncVfioClient on gRPC's synchronous stack, from plain code and threads
(under gevent: test_sync_gevent.py)."""

from __future__ import annotations

import errno
import inspect
import itertools
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from driver.shards import pci_name
from tests.support.vfioctl_driver import Driver
from vfioclient import VfioClient, VfioClientError
from vfioclient.sync import SyncVfioClient
from vfioclient.uapi import VFIO_MIGRATION_STOP_COPY, MigState
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


def save_and_resume(
    src: SyncVfioClient, dst: SyncVfioClient, source: int, dest: int
) -> tuple[int, int, int, int]:
    """VF `source` opened by `src` and saving (STOP_COPY), VF `dest` opened
    by `dst` and resuming: (source fd, dest fd, saving data fd, resuming data fd)."""
    sfd, dfd = src.open_device(pci_name(source)), dst.open_device(pci_name(dest))
    src.set_state(sfd, MigState.STOP)
    data_fd = src.set_state(sfd, MigState.STOP_COPY)
    resume_fd = dst.set_state(dfd, MigState.RESUMING)
    assert data_fd is not None and resume_fd is not None
    return sfd, dfd, data_fd, resume_fd


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
            _, dfd, data_fd, resume_fd = save_and_resume(src, dst, 2, 3)
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


def precopy_round(c: SyncVfioClient, name: str, polls: int = 5) -> dict[str, int]:
    """One user's PRE_COPY round on VF `name`, as the load test's users do
    it: open, opt in to precopy info v2, PRE_COPY, read the initial data to
    ENOMSG with a precopy_info after each read, poll precopy_info, close the
    data fd and read it again (EBADF), back to RUNNING.  What it saw, for
    `check_round` (also from greenlets: test_sync_gevent.py)."""
    fd = c.open_device(name)
    v2 = c.enable_precopy_info_v2(fd)
    data_fd = c.set_state(fd, MigState.PRE_COPY)
    assert data_fd is not None
    initial = c.precopy_info(data_fd).initial_bytes
    got = empty = 0
    while not empty:
        try:
            chunk = c.read(data_fd, 64 << 10)
        except VfioClientError as e:
            empty = e.errno or -1
            break
        if not chunk:
            break  # end of stream: not what PRE_COPY gives (check_round says so)
        got += len(chunk)
        c.precopy_info(data_fd)
    left = max(c.precopy_info(data_fd).initial_bytes for _ in range(polls))
    c.close(data_fd)
    try:
        c.read(data_fd, 1)
        closed = 0
    except VfioClientError as e:
        closed = e.errno or -1
    c.set_state(fd, MigState.RUNNING)
    c.close(fd)
    return {
        "v2": int(v2),
        "initial": initial,
        "read": got,
        "empty_errno": empty,
        "left": left,
        "closed_errno": closed,
    }


def check_round(r: dict[str, int]) -> None:
    """PRE_COPY gives its initial data, then ENOMSG (the kernel's
    mlx5vf_save_read when nothing is queued); precopy_info then counts no
    initial bytes; a closed fd is EBADF."""
    assert r["v2"] == 1, r
    assert 0 < r["initial"] <= r["read"], r
    assert r["empty_errno"] == errno.ENOMSG, r
    assert r["left"] == 0, r
    assert r["closed_errno"] == errno.EBADF, r


@pytest.fixture(name="six_vfs")
def six_vfs_fixture() -> Iterator[Driver]:
    d = Driver.start(vfs=6)
    try:
        yield d
    finally:
        d.stop()


def test_threads_share_a_client_or_use_their_own(six_vfs: Driver) -> None:
    """Six threads at once: three on one shared client, three with a client
    each; every round completes, with the kernel's errnos."""
    results: dict[int, dict[str, int]] = {}
    failures: list[BaseException] = []
    shared = SyncVfioClient.connect(six_vfs.target)

    def user(vf: int) -> None:
        try:
            if vf <= 3:
                results[vf] = precopy_round(shared, pci_name(vf))
            else:
                with SyncVfioClient.connect(six_vfs.target) as own:
                    results[vf] = precopy_round(own, pci_name(vf))
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=user, args=(vf,)) for vf in range(1, 7)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    shared.close_client()
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, failures
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    for r in results.values():
        check_round(r)
    assert time.monotonic() - start < 30


def test_a_client_holds_no_thread_between_calls(driver: Driver) -> None:
    """No event loop, no thread of its own, none left by the Session or a
    stream read part way: a call runs in its caller's thread."""
    before = threading.active_count()
    with SyncVfioClient.connect(driver.target) as c:
        fd = c.open_device(pci_name(1))
        data_fd = c.set_state(fd, MigState.PRE_COPY)
        assert data_fd is not None
        for _ in c.read_stream(data_fd, chunk_size=4096):
            break
        c.precopy_info(data_fd)
        assert threading.active_count() == before
    assert threading.active_count() == before


def test_unreachable_is_enotconn() -> None:
    with pytest.raises(VfioClientError) as e:
        SyncVfioClient.connect("127.0.0.1:1", timeout=2.0)
    assert e.value.errno == errno.ENOTCONN


def test_a_driver_that_never_answers_times_out() -> None:
    """A listener that accepts and says nothing (no HTTP/2, no TLS): connect
    gives up after `timeout`, ENOTCONN."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(VfioClientError) as e:
            SyncVfioClient.connect(target, timeout=1.0)
        took = time.monotonic() - start
    assert e.value.errno == errno.ENOTCONN
    assert "timed out" in str(e.value)
    assert 1.0 <= took < 5.0


def test_close_client_ends_the_session(driver: Driver) -> None:
    """close_client closes the client's fds on the driver (its Session
    ended); the client's calls are EBADF from then on, and closing again
    does nothing."""
    with SyncVfioClient.connect(driver.target) as watcher:
        c = SyncVfioClient.connect(driver.target)
        c.open_device(pci_name(1))
        assert _open_count(watcher, pci_name(1)) == 1
        c.close_client()
        deadline = time.monotonic() + 10
        while _open_count(watcher, pci_name(1)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _open_count(watcher, pci_name(1)) == 0
    for call in (c.list_devices, lambda: c.write(3, b"x"), lambda: list(c.read_stream(3))):
        with pytest.raises(VfioClientError) as e:
            call()
        assert e.value.errno == errno.EBADF
    c.close_client()


def _open_count(c: SyncVfioClient, name: str) -> int:
    return next(d.open_count for d in c.list_devices() if d.name == name)


def test_write_raises_what_its_iterator_raised(driver: Driver) -> None:
    """The chunks come from the caller's iterator, consumed as the call goes:
    its exception ends the call and is the one raised, not a gRPC status."""
    with SyncVfioClient.connect(driver.target) as c:
        _, _, data_fd, resume_fd = save_and_resume(c, c, 1, 2)

        def chunks() -> Iterator[bytes]:
            yield from itertools.islice(c.read_stream(data_fd, chunk_size=16 << 10), 2)
            raise ValueError("the source failed")

        with pytest.raises(ValueError, match="the source failed"):
            c.write(resume_fd, chunks())


# What only an event loop can give: the sync client has the rest, alike.
ASYNC_ONLY = {"aclose", "read_into_stream", "write_from_stream"}


def test_the_sync_client_has_the_async_clients_calls() -> None:
    """Every public method of VfioClient is SyncVfioClient's, with the same
    parameters (name, kind, default), but for the stream calls that need a loop."""
    for name, method in inspect.getmembers(VfioClient, inspect.isfunction):
        if name.startswith("_") or name in ASYNC_ONLY:
            continue
        mine = getattr(SyncVfioClient, name, None)
        assert callable(mine), f"SyncVfioClient has no {name}"
        want = [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(mine).parameters.values()]
        assert got[1:] == want[1:], name

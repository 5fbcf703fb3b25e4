"""CreateMkey on a shared memory segment maps only what it may (fwemu/hostmem.py,
fwemu/service/memory.py; issue 12 item 5), without TLS: a single path
component, never through a symbolic link, a regular file with one link, of a
peer's uid where the peers are known (a unix socket), and not a segment
another principal's mkey maps.  Each refusal is an outbox (gRPC OK), maps
nothing and quotes no byte of the file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
from fwemu.hostmem import create_segment, open_checked
from fwemu.link.grpc import GrpcLink, ShmBuffer
from fwemu.link.ifc import CmdStatus, MkeyResult, Syndrome
from fwemu.model import Firmware, VirtualClock
from fwemu.service.memory import MkeyMemory, Owner
from fwemu.service.server import FirmwareServer

SIZE = 64 * 1024
SECRET = b"root-only secret: do not quote me"
A, B = Owner("spiffe://x/team-a", "c"), Owner("spiffe://x/team-b", "c")


@pytest.fixture
def shm(tmp_path: Path) -> Path:
    d = tmp_path / "shm"
    d.mkdir()
    return d


def _segment(path: Path, data: bytes = b"") -> Path:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.ftruncate(fd, SIZE)
    os.close(fd)
    return path


def _memory(shm: Path, **kw: object) -> MkeyMemory:
    return MkeyMemory(
        Firmware(VirtualClock()),
        shm_dir=str(shm),
        max_remote_bytes=1 << 30,
        **kw,  # type: ignore[arg-type]
    )


def _refused(r: MkeyResult, status: int, syndrome: int) -> None:
    assert (r.status, r.syndrome) == (status, syndrome), r
    assert SECRET.decode()[:8] not in r.diagnostic


def test_a_symbolic_link_is_never_followed(shm: Path, tmp_path: Path) -> None:
    """Neither to a file outside the directory nor to a segment inside it."""
    outside = tmp_path / "shadow"
    outside.write_bytes(SECRET.ljust(SIZE, b"\0"))
    inside = _segment(shm / "real")
    (shm / "out").symlink_to(outside)
    (shm / "in").symlink_to(inside)
    mem = _memory(shm)
    for name in ("out", "in"):
        r = mem.create(A, SIZE, shm_name=name, remote=False)
        _refused(r, CmdStatus.BAD_PARAM_ERR, Syndrome.SEGMENT_REFUSED)
        assert "symbolic link" in r.diagnostic
    assert len(mem.fw.mkeys) == 0
    assert outside.read_bytes() == SECRET.ljust(SIZE, b"\0")


def test_only_a_regular_file_is_mapped(shm: Path) -> None:
    os.mkfifo(shm / "fifo")  # opening it must not block
    (shm / "dir").mkdir()
    mem = _memory(shm)
    for name in ("fifo", "dir"):
        r = mem.create(A, SIZE, shm_name=name, remote=False)
        _refused(r, CmdStatus.BAD_PARAM_ERR, Syndrome.SEGMENT_REFUSED)
        assert "not a regular file" in r.diagnostic
    assert len(mem.fw.mkeys) == 0


def test_a_file_with_another_name_is_not_mapped_until_it_is_alone(shm: Path) -> None:
    seg = _segment(shm / "seg")
    os.link(seg, shm / "alias")
    mem = _memory(shm)
    r = mem.create(A, SIZE, shm_name="seg", remote=False)
    _refused(r, CmdStatus.BAD_PARAM_ERR, Syndrome.SEGMENT_REFUSED)
    assert "2 links" in r.diagnostic
    os.unlink(shm / "alias")
    assert mem.create(A, SIZE, shm_name="seg", remote=False).ok


@pytest.mark.parametrize(
    "name", ["../victim", "sub/victim", "victim\0", ".victim", "victim\n", "", ".."]
)
def test_a_name_is_one_plain_path_component(shm: Path, name: str) -> None:
    _segment(shm.parent / "victim", SECRET)
    (shm / "sub").mkdir()
    _segment(shm / "sub" / "victim", SECRET)
    mem = _memory(shm)
    r = mem.create(A, SIZE, shm_name=name, remote=False)
    assert r.status == CmdStatus.BAD_PARAM_ERR and "plain file name" in r.diagnostic
    assert len(mem.fw.mkeys) == 0


def test_a_segment_of_an_untrusted_owner_is_refused(shm: Path) -> None:
    """Where the peers' uids are known (a unix socket: this user or root)."""
    _segment(shm / "seg")
    untrusted = _memory(shm, segment_uids=frozenset({os.geteuid() + 1}))
    r = untrusted.create(A, SIZE, shm_name="seg", remote=False)
    _refused(r, CmdStatus.BAD_PARAM_ERR, Syndrome.SEGMENT_REFUSED)
    assert f"uid {os.geteuid()}" in r.diagnostic
    assert (
        _memory(shm, segment_uids=frozenset({os.geteuid()}))
        .create(A, SIZE, shm_name="seg", remote=False)
        .ok
    )


def test_a_segment_another_principal_maps_is_busy_until_it_is_released(shm: Path) -> None:
    _segment(shm / "seg")
    mem = _memory(shm)
    first = mem.create(A, SIZE, shm_name="seg", remote=False)
    again = mem.create(Owner(A.principal, "other-client"), SIZE, shm_name="seg", remote=False)
    assert first.ok and again.ok  # within a principal, as before
    r = mem.create(B, SIZE, shm_name="seg", remote=False)
    _refused(r, CmdStatus.BAD_RES_ERR, Syndrome.SEGMENT_BUSY)
    assert len(mem.fw.mkeys) == 2
    assert mem.destroy(first.mkey, A.principal).ok
    r = mem.create(B, SIZE, shm_name="seg", remote=False)
    _refused(r, CmdStatus.BAD_RES_ERR, Syndrome.SEGMENT_BUSY)  # one mkey still maps it
    assert mem.destroy(again.mkey, A.principal).ok
    assert mem.create(B, SIZE, shm_name="seg", remote=False).ok


def test_a_name_linked_before_the_owner_unlinked_its_own_is_still_busy(shm: Path) -> None:
    """The intruder hard-links the victim's segment while its name exists;
    once the victim unlinks its name, the intruder's is the only one."""
    seg = _segment(shm / "victim")
    mem = _memory(shm)
    assert mem.create(A, SIZE, shm_name="victim", remote=False).ok
    os.link(seg, shm / "mine")
    os.unlink(seg)
    r = mem.create(B, SIZE, shm_name="mine", remote=False)
    _refused(r, CmdStatus.BAD_RES_ERR, Syndrome.SEGMENT_BUSY)


def test_a_segment_too_small_says_so_without_its_bytes(shm: Path) -> None:
    _segment(shm / "seg", SECRET)
    r = _memory(shm).create(A, 2 * SIZE, shm_name="seg", remote=False)
    assert r.status == CmdStatus.BAD_PARAM_ERR and "smaller than" in r.diagnostic
    assert "secret" not in r.diagnostic


def test_segment_names_are_unguessable(shm: Path) -> None:
    segs = [create_segment(4096, str(shm)) for _ in range(2)]
    try:
        names = [s.name for s in segs]
        for n in names:
            assert re.fullmatch(rf"fwemu-{os.getpid()}-[0-9a-f]{{32}}", n), n
        assert names[0].rsplit("-", 1)[1] != names[1].rsplit("-", 1)[1]
        fd, st = open_checked(names[0], str(shm))  # the checks pass on our own segment
        os.close(fd)
        assert st.st_nlink == 1
    finally:
        for s in segs:
            s.close()


@pytest.mark.grpc
async def test_over_grpc_a_refusal_is_an_outbox_and_a_link_still_shares_memory(
    shm: Path, tmp_path: Path
) -> None:
    (shm / "out").symlink_to(_segment(tmp_path / "shadow", SECRET))
    fw = Firmware(VirtualClock())
    server = FirmwareServer(fw, shm_dir=str(shm))
    port = await server.start("127.0.0.1:0")
    assert server.memory.segment_uids is None  # over TCP the peer's uid is unknown
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = await fgrpc.FirmwareStub(ch).CreateMkey(
                fpb.CreateMkeyRequest(length=SIZE, shm_name="out")
            )
        assert (r.status, r.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.SEGMENT_REFUSED)
        link = await GrpcLink.connect(f"127.0.0.1:{port}", memory="shm", shm_dir=str(shm))
        try:
            buf = await link.alloc_buffer(SIZE)
            assert isinstance(buf, ShmBuffer) and fw.mkey_view(buf.mkey) is not None
        finally:
            await link.close()
    finally:
        await server.stop(0)


@pytest.mark.grpc
async def test_on_a_unix_socket_a_segment_must_be_a_peers(shm: Path, tmp_path: Path) -> None:
    """Its peers are this user or root (socket mode 0600): a segment of any
    other uid is refused."""
    fw = Firmware(VirtualClock())
    server = FirmwareServer(fw, shm_dir=str(shm))
    sock = tmp_path / "fw.sock"
    await server.start(f"unix:{sock}")
    assert server.memory.segment_uids == frozenset({os.geteuid(), 0})
    _segment(shm / "ours")
    foreign = _segment(shm / "theirs")
    can_chown = os.geteuid() == 0
    if can_chown:
        os.chown(foreign, 4242, -1)
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            stub = fgrpc.FirmwareStub(ch)
            ours = await stub.CreateMkey(fpb.CreateMkeyRequest(length=SIZE, shm_name="ours"))
            assert ours.status == CmdStatus.OK
            if can_chown:
                theirs = await stub.CreateMkey(
                    fpb.CreateMkeyRequest(length=SIZE, shm_name="theirs")
                )
                assert (theirs.status, theirs.syndrome) == (
                    CmdStatus.BAD_PARAM_ERR,
                    Syndrome.SEGMENT_REFUSED,
                )
                assert "uid 4242" in theirs.diagnostic
    finally:
        await server.stop(0)

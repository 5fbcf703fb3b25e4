"""A client's mkeys (fwemu/service/memory.py): at most MAX_MKEYS_PER_CLIENT
each, and released when the client is gone, even one that never opened a
Completions stream; one client's clean-up never touches another's mkeys
(issue 11, item 4)."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import CmdStatus, Syndrome
from fwemu.model import Firmware, VirtualClock
from fwemu.service.memory import MAX_MKEYS_PER_CLIENT, MkeyMemory, Owner
from grpcsvc.tls import ANONYMOUS


class Ticks:
    """The reaper's clock, moved by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _memory(**kw: object) -> tuple[MkeyMemory, Ticks]:
    ticks = Ticks()
    fw = Firmware(VirtualClock(), seed=1)
    mem = MkeyMemory(fw, shm_dir=None, max_remote_bytes=1 << 30, clock=ticks, **kw)  # type: ignore[arg-type]
    return mem, ticks


def _client(name: str) -> Owner:
    """A client of the one principal callers without certificates are."""
    return Owner(ANONYMOUS, name)


def _mkey(mem: MkeyMemory, client: str) -> int:
    r = mem.create(_client(client), 4096, shm_name=None, remote=True)
    assert r.ok, r.diagnostic
    return r.mkey


def test_a_client_holds_at_most_its_share_of_mkeys() -> None:
    mem, _ = _memory(max_mkeys_per_client=8)
    for _ in range(8):
        _mkey(mem, "a")
    r = mem.create(_client("a"), 4096, shm_name=None, remote=True)
    assert (r.status, r.syndrome) == (CmdStatus.LIM_ERR, Syndrome.TOO_MANY_MKEYS)
    assert mem.remote_bytes == 8 * 4096  # the refusal took nothing
    assert _mkey(mem, "b")  # another client is not limited by a's
    assert mem.destroy(next(iter(mem._owned[_client("a")])), ANONYMOUS).ok
    assert _mkey(mem, "a")  # a freed one can be made again


def test_the_default_cap_is_4096() -> None:
    assert MAX_MKEYS_PER_CLIENT == 4096


def test_an_idle_client_without_a_stream_loses_its_mkeys_and_no_one_else_does() -> None:
    mem, ticks = _memory(idle_s=60.0)
    gone = [_mkey(mem, "gone") for _ in range(3)]
    busy = [_mkey(mem, "busy") for _ in range(2)]
    streaming = _mkey(mem, "streaming")
    mem.attach(_client("streaming"))  # a Completions stream open, idle meanwhile
    ticks.t = 50.0
    mem.seen(_client("busy"))  # a command, a ReadMkey...
    ticks.t = 100.0
    mem.seen(_client("busy"))
    assert _mkey(mem, "new")  # creating an mkey reaps who is idle
    for mkey in gone:
        assert mem.fw.mkey_view(mkey) is None
    for mkey in [*busy, streaming]:
        assert mem.fw.mkey_view(mkey) is not None
    assert mem.owned(_client("gone")) == 0 and mem.owned(_client("busy")) == 2
    assert mem.remote_bytes == 4 * 4096
    mem.detach(_client("streaming"))  # its last stream ends: its mkeys go, the others stay
    assert mem.fw.mkey_view(streaming) is None and mem.owned(_client("busy")) == 2


def test_a_client_active_within_the_idle_time_keeps_its_mkeys() -> None:
    mem, ticks = _memory(idle_s=60.0)
    mkey = _mkey(mem, "a")
    ticks.t = 59.0
    assert mem.reap_idle() == 0
    assert mem.fw.mkey_view(mkey) is not None
    ticks.t = 61.0
    assert mem.reap_idle() == 1
    assert mem.fw.mkey_view(mkey) is None and mem.remote_bytes == 0


@pytest.mark.grpc
async def test_over_grpc_a_stream_less_client_is_reaped_and_a_streaming_one_is_not() -> None:
    """Two real clients of one FirmwareServer: a raw stub without a Completions
    stream, and a GrpcLink (which keeps one open)."""
    import grpc

    from fwemu.api.v1 import firmware_pb2 as fpb
    from fwemu.api.v1 import firmware_pb2_grpc as fgrpc
    from fwemu.link.grpc import GrpcLink
    from fwemu.service.server import FirmwareServer

    ticks = Ticks()
    fw = Firmware(VirtualClock(), seed=1)
    srv = FirmwareServer(fw)
    srv.memory = srv.firmware.memory = MkeyMemory(
        fw, shm_dir=None, max_remote_bytes=1 << 30, idle_s=60.0, clock=ticks
    )
    port = await srv.start("127.0.0.1:0")
    try:
        link = await GrpcLink.connect(f"127.0.0.1:{port}", memory="remote")
        kept = await link.alloc_buffer(4096)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = fgrpc.FirmwareStub(ch)
            r = await stub.CreateMkey(fpb.CreateMkeyRequest(length=4096, remote=True))
            assert r.status == CmdStatus.OK
            leaked = r.mkey
        ticks.t = 1000.0
        again = await link.alloc_buffer(4096)  # its CreateMkey reaps the idle client
        assert fw.mkey_view(leaked) is None
        assert fw.mkey_view(kept.mkey) is not None and fw.mkey_view(again.mkey) is not None
        await link.close()
    finally:
        await srv.stop()

"""mkeys over the wire belong to the principal that created them (issue 12,
item 5), against a real FirmwareServer with mutual TLS: another principal's
ReadMkey, WriteMkey, DestroyMkey, SAVE_VHCA_STATE and LOAD_VHCA_STATE on them
answer exactly as for an mkey that does not exist (BAD_RES / UNKNOWN_MKEY)
and change nothing; clients of one principal share its mkeys, and caps and
reaping go per (principal, client)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.link.ifc import CmdStatus, SuspendOpMod, Syndrome
from fwemu.model import Firmware, VirtualClock
from fwemu.service.memory import MkeyMemory, Owner
from fwemu.service.servicers import DOMAIN
from grpcsvc.errors import error_info
from grpcsvc.tls import ANONYMOUS
from tests.fwemu.service.conftest import Served
from tests.support.tls import ADMIN, DRIVER

LENGTH = 256 * 1024
PATTERN = b"\x5a" * LENGTH


def _client(name: str) -> tuple[tuple[str, str], ...]:
    return (("x-fwemu-client", name),)


async def _chunks(mkey: int, data: bytes) -> AsyncIterator[fpb.MkeyData]:
    yield fpb.MkeyData(mkey=mkey, offset=0, data=data)


def _absent(fw: Firmware) -> int:
    while True:
        n = secrets.randbits(32)
        if fw.mkey_view(n) is None:
            return n


async def _read(stub: Any, mkey: int, length: int = LENGTH, **kw: Any) -> bytes:
    out = b""
    async for m in stub.ReadMkey(fpb.ReadMkeyRequest(mkey=mkey, length=length), **kw):
        out += m.data
    return out


async def _suspended(stub: Any, vhca_ids: Iterable[int]) -> None:
    for vhca_id in vhca_ids:
        for op_mod in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
            r = await stub.SuspendVhca(fpb.SuspendVhcaRequest(vhca_id=vhca_id, op_mod=op_mod))
            assert r.status == CmdStatus.OK


def _outbox(m: Any, mkey: int, missing: int) -> tuple[Any, ...]:
    """An answer with the mkey's number written as `mkey`'s."""
    return (m.status, m.syndrome, m.diagnostic.replace(f"{missing:#x}", f"{mkey:#x}"))


@pytest.mark.grpc
async def test_another_principals_mkey_answers_as_one_that_does_not_exist(mtls: Served) -> None:
    """The driver's buffer holding a device image: the admin (who may use the
    Firmware service too) can neither read, write, destroy nor SAVE/LOAD it."""
    driver, other = mtls.firmware(DRIVER), mtls.firmware(ADMIN)
    created = await driver.CreateMkey(fpb.CreateMkeyRequest(length=LENGTH, remote=True))
    mkey = created.mkey
    assert created.status == CmdStatus.OK
    assert (await driver.WriteMkey(_chunks(mkey, PATTERN))).bytes_written == LENGTH
    await _suspended(driver, [1, 2])
    missing = _absent(mtls.fw)

    # ReadMkey: the same gRPC status and ErrorInfo.
    infos = []
    for m in (mkey, missing):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _read(other, m)
        infos.append(error_info(e.value))
    foreign, absent = infos
    assert (foreign.code, foreign.reason, foreign.domain) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "MKEY_RANGE",
        DOMAIN,
    )
    assert foreign.metadata == absent.metadata
    assert foreign.metadata["status"] == str(CmdStatus.BAD_RES_ERR.value)
    assert foreign.message == absent.message.replace(f"{missing:#x}", f"{mkey:#x}")

    # WriteMkey, DestroyMkey, SAVE, LOAD: the same outbox.
    calls = {
        "WriteMkey": lambda m: other.WriteMkey(_chunks(m, b"\x00" * 4096)),
        "DestroyMkey": lambda m: other.DestroyMkey(fpb.DestroyMkeyRequest(mkey=m)),
        "SaveVhcaState": lambda m: other.SaveVhcaState(
            fpb.SaveVhcaStateRequest(vhca_id=1, mkey=m, size=LENGTH)
        ),
        "LoadVhcaState": lambda m: other.LoadVhcaState(
            fpb.LoadVhcaStateRequest(vhca_id=2, mkey=m, size=4096)
        ),
    }
    for name, call in calls.items():
        f, a = await call(mkey), await call(missing)
        assert (f.status, f.syndrome) == (CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY), name
        assert _outbox(f, mkey, missing) == _outbox(a, mkey, missing), name
        assert f.diagnostic == f"no mkey {mkey:#x}", name

    # Nothing changed: the driver still reads its bytes, and may destroy its mkey.
    assert mtls.fw.vf(1).save_in_flight is None and mtls.fw.vf(2).loaded_bytes == 0
    assert await _read(driver, mkey) == PATTERN
    assert (await driver.DestroyMkey(fpb.DestroyMkeyRequest(mkey=mkey))).status == CmdStatus.OK


@pytest.mark.grpc
async def test_clients_of_one_principal_share_its_mkeys(mtls: Served) -> None:
    """x-fwemu-client names a process within a principal: another client of
    the same principal reaches the mkey (as before principals)."""
    stub = mtls.firmware(DRIVER)
    r = await stub.CreateMkey(
        fpb.CreateMkeyRequest(length=LENGTH, remote=True), metadata=_client("one")
    )
    await stub.WriteMkey(_chunks(r.mkey, PATTERN), metadata=_client("one"))
    assert await _read(stub, r.mkey, metadata=_client("two")) == PATTERN


def _memory(**kw: Any) -> MkeyMemory:
    return MkeyMemory(Firmware(VirtualClock()), shm_dir=None, max_remote_bytes=1 << 30, **kw)


def test_the_mkey_cap_is_per_principal_and_client() -> None:
    mem = _memory(max_mkeys_per_client=2)
    a, b = Owner("spiffe://x/a", "c"), Owner("spiffe://x/b", "c")  # one client id, two principals
    for _ in range(2):
        assert mem.create(a, 4096, shm_name=None, remote=True).ok
    r = mem.create(a, 4096, shm_name=None, remote=True)
    assert (r.status, r.syndrome) == (CmdStatus.LIM_ERR, Syndrome.TOO_MANY_MKEYS)
    assert mem.create(b, 4096, shm_name=None, remote=True).ok


def test_one_principals_client_going_away_leaves_anothers_of_the_same_id() -> None:
    """A second principal naming the victim's x-fwemu-client cannot end its
    stream, reap or destroy its mkeys: the owners differ."""
    t = [0.0]
    mem = _memory(idle_s=60.0, clock=lambda: t[0])
    victim, intruder = Owner("spiffe://x/a", "link-1"), Owner(ANONYMOUS, "link-1")
    kept = mem.create(victim, 4096, shm_name=None, remote=True).mkey
    mem.attach(victim)
    mem.attach(intruder)
    mem.detach(intruder)  # the intruder's stream under the same id ends
    assert mem.fw.mkey_view(kept) is not None and mem.owned(victim) == 1
    r = mem.destroy(kept, intruder.principal)
    assert (r.status, r.syndrome) == (CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY)
    t[0] = 1000.0
    assert mem.reap_idle() == 0  # the victim keeps its stream open
    assert mem.fw.mkey_view(kept) is not None
    mem.detach(victim)
    assert mem.fw.mkey_view(kept) is None

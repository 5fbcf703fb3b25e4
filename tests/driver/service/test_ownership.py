"""Devices are owned, as VFIO groups are (issue 12, item 3): a device opened
by one principal is EBUSY to every other principal, admins included, until
the last of the owner's device fds is closed, however it closes (close, the
end of a Session, the channel going away, the driver stopping).  Within a
principal opens behave as before.  drivers/vfio/group.c:
vfio_group_fops_open answers a second opener of a group with -EBUSY.

The firmware is told who holds each VF (FirmwareLink.set_vf_holders) on a
principal's first open and its last close: the holder may then use the
Scenario service on its VF, and nobody else but an admin may."""

from __future__ import annotations

import asyncio
import errno
import time

import grpc
import pytest

from driver.holders import DeviceHolders
from driver.vfio.device import VfioDevice
from driver.vfio.group import VfioGroup
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.base import LinkError
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware
from tests.driver.service.tenancy import (
    WORKLOAD,
    A,
    B,
    Tenancy,
    TenantClient,
    finish_migration,
    start_migration,
)
from tests.support.driver_service import VfioCallError, eventually
from tests.support.tls import ADMIN
from tests.support.vfio_fakes import raises_errno

pytestmark = pytest.mark.grpc


async def ebusy(client: TenantClient, name: str) -> bool:
    """Opening `name` is EBUSY, with its ErrorInfo."""
    try:
        fd = await client.open_device(name)
    except VfioCallError as e:
        assert e.info.reason == "EBUSY" and e.code == grpc.StatusCode.UNAVAILABLE
        return e.errno == errno.EBUSY
    await client.close(fd)
    return False


async def test_a_device_open_by_one_principal_is_ebusy_to_every_other(tenancy: Tenancy) -> None:
    t = tenancy
    src, dst = await t.create_vfs(2, **WORKLOAD)
    (vf,) = await t.create_vfs()
    a, a2 = await t.client(A), await t.client(A)  # two processes of one principal
    b, admin = await t.client(B), await t.client(ADMIN)
    m = await start_migration(a, src, dst)
    for other in (b, admin):
        assert await ebusy(other, src.name) and await ebusy(other, dst.name)
    # Within the principal, as before: more fds, from any of its processes.
    more = [await a2.open_device(src.name), await a.open_device(src.name)]
    assert (await b.device_info(src.name)).open_count == 3
    await a2.close(more[0])
    await a.close(more[1])

    fd_a, fd_a2 = await a.open_device(vf.name), await a2.open_device(vf.name)
    await a.close(fd_a)
    assert await ebusy(b, vf.name)  # a2's fd still holds it
    await a2.close(fd_a2)  # the last: the device is free
    fd_b = await b.open_device(vf.name)
    assert await ebusy(a, vf.name) and await ebusy(admin, vf.name)
    await b.close(fd_b)
    # The refused opens changed nothing of the migration in flight.
    await finish_migration(m, t)


@pytest.mark.parametrize("how", ["close", "session-end", "channel-gone", "driver-stop"])
async def test_ownership_goes_with_the_last_fd_however_it_closes(
    tenancy: Tenancy, how: str
) -> None:
    t = tenancy
    (vf,) = await t.create_vfs()
    a, b = await t.client(A), await t.client(B)
    fd = await a.open_device(vf.name)
    await a.open_device(vf.name)
    core = t.server.registry.devices[vf.name].core
    assert core.group.opened_by == t.principal(A)
    if how == "close":
        await a.close(fd)
        assert core.group.opened_by == t.principal(A)
        await a.close(fd + 1)
    elif how == "session-end":
        await a.end_session()
    elif how == "channel-gone":
        await a.close_channel()
    else:
        await t.server.stop(0)
        assert core.group.opened_by is None and core.open_count == 0
        assert t.fw.holders == {}
        return

    async def free() -> bool:
        return core.group.opened_by is None

    assert await eventually(free)
    await b.open_device(vf.name)
    assert core.group.opened_by == t.principal(B)


async def test_the_firmware_learns_the_holders_and_lets_them_use_scenario(
    tenancy: Tenancy,
) -> None:
    """First open and last close reach the firmware; the holder reaches its
    VF's Scenario requests (digests), the other tenant does not, an admin does."""
    t = tenancy
    va, vb = await t.create_vfs(2)
    a, b, admin = await t.client(A), await t.client(B), await t.client(ADMIN)
    assert t.fw.holders == {}
    fd = await a.open_device(va.name)
    assert t.fw.holders == {va.vhca_id: frozenset({t.principal(A)})}
    fd2 = await a.open_device(va.name)
    await a.close(fd)
    assert t.fw.holders == {va.vhca_id: frozenset({t.principal(A)})}

    def digest(c: TenantClient, vhca_id: int) -> object:
        stub = sgrpc.ScenarioStub(c.channel)
        return stub.GetDigest(spb.GetDigestRequest(vhca_id=vhca_id))

    assert (await digest(a, va.vhca_id)).digest == await t.digest(va)  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError):
        await digest(b, va.vhca_id)  # type: ignore[misc]
    assert (await digest(admin, va.vhca_id)).digest  # type: ignore[attr-defined]
    await b.open_device(vb.name)
    assert t.fw.holders == {
        va.vhca_id: frozenset({t.principal(A)}),
        vb.vhca_id: frozenset({t.principal(B)}),
    }
    await a.close(fd2)
    assert t.fw.holders == {vb.vhca_id: frozenset({t.principal(B)})}
    with pytest.raises(grpc.aio.AioRpcError):
        await digest(a, va.vhca_id)  # type: ignore[misc]


def test_a_group_has_one_opener_and_counts_its_fds() -> None:
    g = VfioGroup("0000:81:00.1")
    assert g.get("a") and not g.get("a")
    with raises_errno(errno.EBUSY):
        g.get("b")
    assert (g.opened_by, g.users) == ("a", 2)  # a refusal changes nothing
    assert not g.put("a") and g.put("a")
    assert g.opened_by is None and g.get("b")
    with pytest.raises(ValueError):
        g.put("a")


class _Device:
    """A variant driver whose open may fail."""

    def __init__(self) -> None:
        self.fail = False
        self.migration_flags = 0
        self.mig_ops = None
        self.log_ops = None

    async def open_device(self) -> None:
        if self.fail:
            raise LinkError("the firmware is away")

    async def close_device(self) -> None:
        pass


class _Unreachable(InProcessLink):
    """A link whose firmware does not take holders (it answers an error)."""

    def __init__(self) -> None:
        super().__init__(Firmware(LoopClock(), seed=1))
        self.told: list[tuple[int, frozenset[str]]] = []
        self.refuse = True

    async def set_vf_holders(self, vhca_id: int, principals: frozenset[str]) -> None:
        if self.refuse:
            raise LinkError("firmware unreachable")
        self.told.append((vhca_id, principals))


async def test_a_failed_open_leaves_the_device_free_and_tells_nobody() -> None:
    link = _Unreachable()
    link.refuse = False
    holders = DeviceHolders([link])
    dev = VfioDevice("d", _Device())  # type: ignore[arg-type]
    dev.driver.fail = True  # type: ignore[attr-defined]
    with pytest.raises(LinkError):
        await holders.open(dev, "a", link, 7)
    assert dev.group.opened_by is None and dev.open_count == 0 and link.told == []
    dev.driver.fail = False  # type: ignore[attr-defined]
    await (await holders.open(dev, "b", link, 7)).wait()
    await holders.close(dev, "b")
    assert link.told == [(7, frozenset({"b"})), (7, frozenset())]


async def test_a_firmware_that_refuses_the_holders_fails_no_open_and_is_told_again_when_up() -> (
    None
):
    link = _Unreachable()
    holders = DeviceHolders([link])
    d1 = VfioDevice("d1", _Device())  # type: ignore[arg-type]
    d2 = VfioDevice("d2", _Device())  # type: ignore[arg-type]
    await (await holders.open(d1, "a", link, 1)).wait()
    await (await holders.open(d2, "b", link, 2)).wait()
    await holders.close(d2, "b")
    assert d1.open_count == 1 and link.told == []
    link.refuse = False
    link._state_changed(True, "back")  # what a link does when it comes back up

    async def told() -> bool:
        return sorted(link.told) == [(1, frozenset({"a"})), (2, frozenset())]

    assert await eventually(told)
    await holders.aclose()


async def test_a_slow_firmware_holds_an_open_up_for_a_moment_only(
    tenancy: Tenancy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A firmware that does not answer SetVfHolders: the open returns its fd
    after `wait`, and the firmware is told once it answers."""
    t = tenancy
    (vf,) = await t.create_vfs()
    link = t.firmware.link
    answer = asyncio.Event()
    told = link.set_vf_holders

    async def slow(vhca_id: int, principals: frozenset[str]) -> None:
        await answer.wait()
        await told(vhca_id, principals)

    monkeypatch.setattr(link, "set_vf_holders", slow)
    t.server.registry.holders.wait = 0.2
    a = await t.client(A)
    started = time.monotonic()
    fd = await a.open_device(vf.name)
    assert 0.2 <= time.monotonic() - started < 2 and t.fw.holders == {}
    answer.set()

    async def heard() -> bool:
        return t.fw.holders == {vf.vhca_id: {t.principal(A)}}

    assert await eventually(heard)
    await a.close(fd)
    assert t.fw.holders == {}

"""Events and Audit show a principal only its own devices (issue 12, item 4):
a principal that is not an admin sees the events and findings of the
devices it holds open, from its own calls or the driver's own, and of no
device only from its own calls; so never another principal's client ids,
not even in an errno answered to someone else on its device, nor a
"dropped" notice caused by others' events.  Admins see everything.
Publishing stays O(1) in the subscribers of other principals."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from driver.api.v1 import vfio_pb2 as pb
from driver.audit import REINIT_WITHOUT_V2
from driver.events import EventBus, SaveCompleted
from tests.driver.service.tenancy import (
    A,
    B,
    S,
    Tenancy,
    TenantClient,
    events_until,
    next_event,
)
from tests.support.driver_service import errno_of
from tests.support.tls import ADMIN

pytestmark = pytest.mark.grpc


def closed_99(client: TenantClient) -> Any:
    """The error event of `client`'s Close(99): a marker of no device."""
    return lambda ev: (
        ev.WhichOneof("kind") == "error"
        and ev.client == client.client_id
        and ev.error.operation == "close"
    )


async def test_events_show_a_principal_its_own_devices_and_ids_only(tenancy: Tenancy) -> None:
    t = tenancy
    da, db = await t.create_vfs(2)
    a, b, admin = await t.client(A, "orch"), await t.client(B, "orch-b"), await t.client(ADMIN)
    a_all, a_on_b = await a.events(), await a.events(db.name)
    b_all, b_on_a = await b.events(), await b.events(da.name)
    everything = await admin.events()

    fa = await a.open_device(da.name)
    await a.set_state(fa, S.STOP)
    assert await errno_of(b.open_device(da.name)) == errno.EBUSY  # an error on A's device
    fb = await b.open_device(db.name)
    await b.set_state(fb, S.STOP)
    assert await errno_of(b.close(99)) == errno.EBADF
    assert await errno_of(a.close(99)) == errno.EBADF

    seen_a = await events_until(a_all, closed_99(a))
    assert {(e.device, e.client) for e in seen_a} == {(da.name, "orch"), ("", "orch")}
    assert not [e for e in seen_a if e.WhichOneof("kind") == "error" and e.device]
    seen_b = await events_until(b_all, closed_99(b))
    assert {(e.device, e.client) for e in seen_b} == {(db.name, "orch-b"), ("", "orch-b")}
    seen = await events_until(everything, closed_99(a))
    busy = [e for e in seen if e.WhichOneof("kind") == "error" and e.error.errno_name == "EBUSY"]
    assert [(e.device, e.client) for e in busy] == [(da.name, "orch-b")]  # admins see all
    assert {e.device for e in seen} == {da.name, db.name, ""}

    # Nothing reached the filtered streams of each other's devices: the first
    # event each gets is its own, once the device changed hands.
    await a.close(fa)
    await b.close(fb)
    fb = await b.open_device(da.name)
    await b.set_state(fb, S.STOP)
    first = await next_event(b_on_a)
    assert (first.device, first.client, first.WhichOneof("kind")) == (
        da.name,
        "orch-b",
        "state_change",
    )
    fa = await a.open_device(db.name)
    await a.set_state(fa, S.STOP)
    first = await next_event(a_on_b)
    assert (first.device, first.client) == (db.name, "orch")
    for call in (a_all, a_on_b, b_all, b_on_a, everything):
        call.cancel()


async def test_others_events_cause_no_dropped_notice(tenancy: Tenancy) -> None:
    """A tenant's tiny queue loses nothing to another tenant's busy device."""
    t = tenancy
    da, db = await t.create_vfs(2)
    a, b = await t.client(A), await t.client(B)
    bus = t.server.registry.events
    bus.queue_size = 2
    b_all = await b.events()
    (sub,) = [s for s in bus.subscribers if s.principal == t.principal(B)]
    bus.queue_size = 1024
    fa = await a.open_device(da.name)
    offered = bus.offered
    for _ in range(10):
        await a.set_state(fa, S.STOP)
        await a.set_state(fa, S.RUNNING)
    assert bus.published >= 20 and bus.offered == offered  # nobody else watches
    assert sub.dropped == 0 and sub.pending == 0
    fb = await b.open_device(db.name)
    await b.set_state(fb, S.STOP)
    first = await next_event(b_all)
    assert first.WhichOneof("kind") == "state_change" and first.device == db.name
    b_all.cancel()


def test_publishing_offers_an_event_to_its_principal_and_admins_only() -> None:
    """1,000 other principals' unfiltered subscribers cost a publish nothing."""
    holders = {"d": "p7"}
    bus = EventBus(holder_of=holders.get)
    others = [bus.subscribe(client="c", principal=f"p{i}", sees_all=False) for i in range(1000)]
    admin = bus.subscribe(client="c", principal="root")
    bus.publish("d", SaveCompleted(1), principal="p7")
    assert bus.offered == 2 and others[7].pending == 1 and admin.pending == 1
    bus.publish("d", SaveCompleted(2), principal="p8")  # p8 does not hold d
    bus.publish("", SaveCompleted(3), principal="p9")  # no device: p9's own
    bus.publish("d", SaveCompleted(4), principal="")  # the driver's own, on p7's device
    assert bus.offered == 7
    assert [others[i].pending for i in (7, 8, 9)] == [2, 0, 1] and admin.pending == 4


async def test_audit_shows_a_principal_the_findings_of_its_devices_only(
    tenancy: Tenancy,
) -> None:
    t = tenancy
    (da,) = await t.create_vfs()
    a, b, admin = await t.client(A, "orch"), await t.client(B, "orch-b"), await t.client(ADMIN)
    fa = await a.open_device(da.name)
    saving = await a.set_state(fa, S.PRE_COPY)
    await a.precopy_info(saving, flags=1)  # flags without the v2 opt-in: a finding

    def rules(r: pb.AuditResponse) -> list[tuple[str, str]]:
        return [(f.rule, f.client) for f in r.findings]

    mine = [(REINIT_WITHOUT_V2, "orch")]
    assert rules(await a.audit()) == rules(await a.audit(da.name)) == mine
    assert dict((await a.audit()).counts) == {REINIT_WITHOUT_V2: 1}
    for r in (await b.audit(), await b.audit(da.name)):
        assert rules(r) == [] and dict(r.counts) == {}
    assert rules(await admin.audit()) == mine

    await a.close(saving)
    await a.close(fa)
    assert rules(await a.audit()) == []  # no longer its device
    fb = await b.open_device(da.name)
    r = await b.audit(da.name)
    assert rules(r) == [] and dict(r.counts) == {}  # its device now, not A's findings
    assert rules(await admin.audit(da.name)) == mine
    await b.close(fb)

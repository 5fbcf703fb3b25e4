"""Identity is the authenticated principal (issue 12, item 2): on the driver,
`x-vfio-client` names a process within its principal only.

The attacker (team-b) knows the victim's (team-a) x-vfio-client value and
sends it: every fd of the victim is EBADF to it, however it is used (read,
precopy info, write, DEVICE_FEATURE, reset, close); a Session it opens under
that id and cancels ends its own process, not the victim's.  Its Events
streams carry none of the victim's events nor its client id, and its Audit
none of the victim's findings.  Meanwhile the victim migrates, and its
destination's digest equals its source's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from driver.api.v1 import vfio_pb2 as pb
from tests.security.rig import (
    ADMIN,
    ATTACKER,
    VICTIM,
    Parties,
    S,
    Victim,
    audit,
    events_until,
    refused,
    subscribe,
)
from tests.support.driver_service import VfioClient, eventually

pytestmark = pytest.mark.grpc

VICTIM_ID = "orchestrator-7"  # the victim's x-vfio-client; the attacker sends it too
# fd numbers the attacker tries: the victim's and the ones near them.
GUESSES = range(3, 12)


async def _every_use_is_ebadf(thief: VfioClient, fd: int) -> None:
    await refused(thief.read(fd, 4096), "EBADF")
    await refused(thief.precopy_info(fd), "EBADF")
    await refused(thief.write(fd, [b"\0" * 16]), "EBADF")
    await refused(thief.set_state(fd, S.RUNNING), "EBADF")
    await refused(thief.reset(fd), "EBADF")
    await refused(thief.close(fd), "EBADF")


async def test_the_victims_client_id_reaches_none_of_its_fds(mtls: Parties) -> None:
    """While the victim drains and finishes its migration, the attacker,
    sending the victim's x-vfio-client, reads, writes, transitions, resets and
    closes every fd number the victim has: EBADF each time, and the
    victim's migration completes with equal digests."""
    victim = await mtls.vfio(VICTIM, VICTIM_ID)
    v = await Victim.start(mtls, victim)
    assert set(v.fds) <= set(GUESSES)
    thief = await mtls.vfio(ATTACKER, VICTIM_ID)

    async def attack() -> int:
        for fd in GUESSES:
            await _every_use_is_ebadf(thief, fd)
        return 1

    await v.under_attack(attack, at_least=2)


async def test_a_session_under_the_victims_id_ends_only_the_attackers_process(
    mtls: Parties,
) -> None:
    """The attacker opens a Session under the victim's id and cancels it: the
    session it ended was its own process's (its device is free again), and
    the victim's fds stay open: its migration goes on to equal digests."""
    victim = await mtls.vfio(VICTIM, VICTIM_ID)
    v = await Victim.start(mtls, victim)
    (own,) = await mtls.vfs(1)
    thief = await mtls.vfio(ATTACKER, VICTIM_ID, session=False)
    fd = await thief.open_device(own.name)
    assert await thief.open_session() == VICTIM_ID  # the id, within the attacker's principal
    await thief.end_session()
    admin = await mtls.vfio(ADMIN)

    async def attackers_process_ended() -> bool:
        return (await admin.device_info(own.name)).open_count == 0

    assert await eventually(attackers_process_ended)
    await refused(thief.close(fd), "EBADF")  # its fds went with its session
    for name in v.devices:
        assert (await admin.device_info(name)).open_count == 1
    await v.drain()
    await v.finish()


async def test_events_and_audit_show_the_attacker_nothing_of_the_victim(mtls: Parties) -> None:
    """The attacker watches every device, and the victim's two by name,
    while the victim migrates (and reads once past the end of its stream, a
    finding): it sees only its own events, never the victim's devices or
    client id, and no finding of the victim's.  The admin sees them all."""
    src, dst = await mtls.vfs(2)
    admin = await mtls.vfio(ADMIN, "admin-watch")
    watcher = await mtls.vfio(ATTACKER, "watcher")
    everything = await subscribe(admin)
    watched = await subscribe(watcher)
    on_victims = [await subscribe(watcher, vf.name) for vf in (src, dst)]

    victim = await mtls.vfio(VICTIM, VICTIM_ID)
    v = await Victim.start(mtls, victim, [src, dst])
    await v.stop_copy()
    assert await victim.read(v.saving, 1) == b""  # read after EOF: a finding
    await v.complete()

    # A marker of no device: the attacker's own Close(99), then the admin's.
    await refused(watcher.close(99), "EBADF")
    await refused(admin.close(99), "EBADF")

    def closed_99(client_id: str) -> Callable[[pb.Event], bool]:
        return lambda ev: (
            ev.WhichOneof("kind") == "error"
            and ev.client == client_id
            and ev.error.operation == "close"
        )

    seen = await events_until(watched, closed_99("watcher"))
    assert {(e.device, e.client) for e in seen} == {("", "watcher")}
    admins = await events_until(everything, closed_99("admin-watch"))
    victims = [e for e in admins if e.client == VICTIM_ID]
    assert {e.device for e in victims} == set(v.devices)
    assert {e.WhichOneof("kind") for e in victims} >= {"state_change", "audit"}

    # The per-device streams got nothing before the devices changed hands:
    # the first event each carries is the attacker's own, once it holds it.
    for vf, call in zip((src, dst), on_victims, strict=True):
        fd = await watcher.open_device(vf.name)
        await watcher.set_state(fd, S.STOP)
        first = await asyncio.wait_for(call.read(), 10)
        assert (first.device, first.client, first.WhichOneof("kind")) == (
            vf.name,
            "watcher",
            "state_change",
        )
        await watcher.close(fd)

    findings = await audit(watcher)
    assert not [f for f in findings.findings if f.device in v.devices or f.client == VICTIM_ID]
    full = await audit(admin)
    assert [(f.rule, f.client) for f in full.findings if f.device in v.devices] == [
        ("read-after-eof", VICTIM_ID)
    ]
    for call in (everything, watched, *on_victims):
        call.cancel()

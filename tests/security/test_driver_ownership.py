"""Devices are owned, as VFIO groups are (issue 12, item 3): while the victim
migrates, the attacker cannot open the source or the destination (EBUSY),
so it can neither transition nor reset them; nor can the admin, as the
kernel answers a second opener of a group.  Once the victim's last fd closes
the devices are anyone's again.  The victim's migration completes with
equal digests."""

from __future__ import annotations

import pytest

from tests.security.rig import ADMIN, ATTACKER, VICTIM, Parties, S, Victim, refused

pytestmark = pytest.mark.grpc


async def test_the_attacker_cannot_open_the_devices_the_victim_migrates(mtls: Parties) -> None:
    victim = await mtls.vfio(VICTIM)
    attacker, other, admin = (
        await mtls.vfio(ATTACKER),
        await mtls.vfio(ATTACKER),
        await mtls.vfio(ADMIN),
    )
    v = await Victim.start(mtls, victim)

    async def attack() -> int:
        opens = 0
        for name in sorted(v.devices):
            for c in (attacker, other, admin):
                await refused(c.open_device(name), "EBUSY")
                opens += 1
        return opens

    await v.under_attack(attack, at_least=12)
    # The victim's last close released both: the attacker may take them now,
    # and whatever it does there is no longer the victim's business.
    for name in v.devices:
        fd = await attacker.open_device(name)
        await attacker.set_state(fd, S.STOP)
        await attacker.reset(fd)
        assert await attacker.get_state(fd) == S.RUNNING
        await refused(victim.open_device(name), "EBUSY")
        await attacker.close(fd)


async def test_the_attackers_own_device_does_not_reach_the_victims(mtls: Parties) -> None:
    """An attacker holding a device of its own transitions and resets it at
    will while the victim migrates on two others: the victim completes."""
    victim, attacker = await mtls.vfio(VICTIM), await mtls.vfio(ATTACKER)
    (own,) = await mtls.vfs(1)
    fd = await attacker.open_device(own.name)
    v = await Victim.start(mtls, victim)
    for _ in range(3):
        await attacker.set_state(fd, S.PRE_COPY)
        await attacker.reset(fd)
    await v.drain()
    await v.finish()
    await attacker.close(fd)

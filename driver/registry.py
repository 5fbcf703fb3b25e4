"""The devices a driver service offers: one mlx5 VF each, bound to mlx5vf and
registered with the VFIO core.  Which VFs exist is what the PF's SR-IOV setup
tells the kernel; here it is the emulator's VF list, of one firmware or of
several (shards: shard k's VFs are PCI domain k, see driver/shards.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fwemu.link.base import FirmwareLink, LinkError
from fwemu.link.ifc import VfInfo

from .audit import AuditLog
from .events import EventBus
from .holders import DeviceHolders
from .mlx5.cmd import DEFAULT_BUFFER_BUDGET, BufferBudget
from .mlx5.main import Mlx5VfDevice
from .priority import DEFAULT_MAX_WAIT_S, SwitchoverPriority
from .shards import ShardSpecError, parse_pci_name, pci_name, shard_of
from .vfio.device import VfioDevice
from .vfio.errors import VfioError

DRIVER_NAME = "mlx5-vfio-pci"

log = logging.getLogger("vfio-driver")


@dataclass(eq=False)
class Registered:
    core: VfioDevice
    mvdev: Mlx5VfDevice
    uid: str = ""  # the firmware's VfInfo.uid: another uid in the slot is another device


class DeviceRegistry:
    """The devices, and the one event bus and audit log they all report to.

    `link` is one firmware, or one link per shard (shard k = links[k]): each
    device's commands go to its own shard's link."""

    def __init__(
        self,
        link: FirmwareLink | Sequence[FirmwareLink],
        *,
        cmd_timeout: float = 60.0,
        max_chunk_size: int = 8 << 20,
        events: EventBus | None = None,
        audit: AuditLog | None = None,
        buffer_budget: int = DEFAULT_BUFFER_BUDGET,
        switchover_priority: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        """`buffer_budget`: the bytes of data buffers the driver holds for one
        client's migration files, over all devices (past it: ENOMEM).
        `switchover_priority`: the longest a principal's precopy request
        waits for its switchovers in progress (driver/priority.py; 0: off)."""
        self.links: tuple[FirmwareLink, ...] = (
            tuple(link) if isinstance(link, Sequence) else (link,)
        )
        if not self.links:
            raise ValueError("a registry needs at least one firmware link")
        self.cmd_timeout = cmd_timeout
        self.max_chunk_size = max_chunk_size
        self.devices: dict[str, Registered] = {}
        self.events = events if events is not None else EventBus()
        self.audit = audit if audit is not None else AuditLog(self.events)
        # Principals that do not see everything see the events and findings
        # of the devices they hold open.
        self.events.holder_of = self.holder_of
        self.holders = DeviceHolders(self.links)
        self.budget = BufferBudget(buffer_budget)
        self.priority = SwitchoverPriority(switchover_priority)

    async def refresh(self) -> list[Registered]:
        """Probe VFs that appeared; VFs that went away are detached (their
        commands get ENOTCONN) and dropped once nobody has them open.

        A shard that does not answer keeps its devices as they were (their
        commands fail on its link until it is back); only when no shard
        answers does the refresh fail (EIO)."""
        listed = await asyncio.gather(*(self._list_vfs(k) for k in range(len(self.links))))
        down = {k: e for k, e in enumerate(listed) if isinstance(e, LinkError)}
        if len(down) == len(self.links):
            raise VfioError(errno.EIO, f"firmware unreachable: {self._why(down)}")
        if down:
            log.warning("firmware shards not answering: %s", self._why(down))
        present = {
            pci_name(vf.function_id, k): (k, vf)
            for k, vfs in enumerate(listed)
            if not isinstance(vfs, LinkError)
            for vf in vfs
        }
        await self._update(present, down, list(self.devices))
        return [self.devices[n] for n in sorted(self.devices)]

    async def _refresh_one(self, name: str) -> None:
        """refresh() for device `name` alone: its shard is asked for its
        function only, so an open costs the same with 8 VFs or 1,000.  A name
        no shard can hold changes nothing; its shard not answering, the whole
        refresh says what it would."""
        try:
            shard, function_id = parse_pci_name(name)
        except ShardSpecError:
            return
        if shard >= len(self.links) or pci_name(function_id, shard) != name:
            return  # not a name a refresh makes: nothing to look at
        listed = await self._list_vfs(shard, (function_id,))
        if isinstance(listed, LinkError):
            await self.refresh()  # EIO, or the device kept as it was
            return
        present = {pci_name(vf.function_id, shard): (shard, vf) for vf in listed}
        await self._update(present, {}, [name] if name in self.devices else [])

    async def _update(
        self,
        present: dict[str, tuple[int, VfInfo]],
        down: dict[int, LinkError],
        known: list[str],
    ) -> None:
        """Detach the devices of `known` gone from `present` (their shard
        answered) or replaced in their slot; probe what `present` has new."""
        for name in known:
            reg = self.devices[name]
            gone = name not in present and shard_of(name) not in down
            # Removed and created again in its slot between two looks: the old
            # device went away (unplugged) and a new one came (replugged).
            replaced = name in present and present[name][1].uid != reg.uid
            if gone or replaced:
                reg.mvdev.mdev_detach = True
                if reg.core.open_count == 0:
                    del self.devices[name]
        for name, (k, vf) in present.items():
            if name in self.devices and not self.devices[name].mvdev.mdev_detach:
                continue
            mvdev = Mlx5VfDevice(
                self.links[k],
                vf.function_id,
                cmd_timeout=self.cmd_timeout,
                max_chunk_size=self.max_chunk_size,
                events=self.events,
                audit=self.audit,
                budget=self.budget,
                priority=self.priority,
            )
            await mvdev.probe()
            core = VfioDevice(name, mvdev)
            mvdev.core = core
            self.devices[name] = Registered(core, mvdev, vf.uid)

    async def _list_vfs(
        self, shard: int, function_ids: Sequence[int] = ()
    ) -> list[VfInfo] | LinkError:
        try:
            return await self.links[shard].list_vfs(function_ids)
        except LinkError as e:
            return e

    def _why(self, down: dict[int, LinkError]) -> str:
        if len(self.links) == 1:
            return str(down[0])
        return "; ".join(f"shard {k}: {e}" for k, e in sorted(down.items()))

    def holder_of(self, name: str) -> str | None:
        """The principal holding device `name` open (None: nobody)."""
        reg = self.devices.get(name)
        return reg.core.group.opened_by if reg is not None else None

    async def lookup(self, name: str, *, fresh: bool = False) -> Registered:
        """The device `name` (ENOENT if none).  `fresh`: look at the firmware's
        VFs first, as open(2) of a device node meets the device that is there
        now: a VF removed, or replaced in its slot, since the last refresh is
        not opened as it was."""
        if fresh or name not in self.devices:
            await self._refresh_one(name)
        reg = self.devices.get(name)
        if reg is None or reg.mvdev.mdev_detach:
            raise VfioError(errno.ENOENT, f"no VFIO device {name}")
        return reg

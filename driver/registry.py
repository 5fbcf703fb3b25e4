"""The devices a driver service offers: one mlx5 VF each, bound to mlx5vf and
registered with the VFIO core.  Which VFs exist is what the PF's SR-IOV setup
tells the kernel; here it is the emulator's VF list."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

from fwemu.link.base import FirmwareLink, LinkError, ScenarioLink

from .audit import AuditLog
from .events import EventBus
from .mlx5.main import Mlx5VfDevice
from .vfio.device import VfioDevice
from .vfio.errors import VfioError

DRIVER_NAME = "mlx5-vfio-pci"
PCI_BUS = "0000:81"


class Link(FirmwareLink, ScenarioLink, Protocol):
    """Both sides of a firmware link (InProcessLink and GrpcLink are both)."""


def pci_name(function_id: int) -> str:
    """VF n of the PF at 0000:81:00.0 sits at 0000:81:<n / 8>.<n % 8>."""
    return f"{PCI_BUS}:{function_id >> 3:02x}.{function_id & 7}"


@dataclass(eq=False)
class Registered:
    core: VfioDevice
    mvdev: Mlx5VfDevice


class DeviceRegistry:
    """The devices, and the one event bus and audit log they all report to."""

    def __init__(
        self,
        link: Link,
        *,
        cmd_timeout: float = 60.0,
        max_chunk_size: int = 8 << 20,
        events: EventBus | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.link = link
        self.cmd_timeout = cmd_timeout
        self.max_chunk_size = max_chunk_size
        self.devices: dict[str, Registered] = {}
        self.events = events if events is not None else EventBus()
        self.audit = audit if audit is not None else AuditLog(self.events)

    async def refresh(self) -> list[Registered]:
        """Probe VFs that appeared; VFs that went away are detached (their
        commands get ENOTCONN) and dropped once nobody has them open."""
        try:
            vfs = await self.link.list_vfs()
        except LinkError as e:
            raise VfioError(errno.EIO, f"firmware unreachable: {e}") from None
        present = {pci_name(v.function_id): v for v in vfs}
        for name, reg in list(self.devices.items()):
            if name not in present:
                reg.mvdev.mdev_detach = True
                if reg.core.open_count == 0:
                    del self.devices[name]
        for name, vf in present.items():
            if name in self.devices and not self.devices[name].mvdev.mdev_detach:
                continue
            mvdev = Mlx5VfDevice(
                self.link,
                vf.function_id,
                cmd_timeout=self.cmd_timeout,
                max_chunk_size=self.max_chunk_size,
                events=self.events,
                audit=self.audit,
            )
            await mvdev.probe()
            core = VfioDevice(name, mvdev)
            mvdev.core = core
            self.devices[name] = Registered(core, mvdev)
        return [self.devices[n] for n in sorted(self.devices)]

    async def lookup(self, name: str) -> Registered:
        if name not in self.devices:
            await self.refresh()
        try:
            return self.devices[name]
        except KeyError:
            raise VfioError(errno.ENOENT, f"no VFIO device {name}") from None

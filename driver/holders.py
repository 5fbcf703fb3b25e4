"""Who holds each device open, and the firmware told of it.

Devices are owned as VFIO groups are (driver/vfio/group.py): the device fds
of one principal share a device, every other principal gets EBUSY until the
last of them is closed, by whatever path (close, the end of a Session, the
driver stopping).

On a principal's first open of a device and its last close the driver tells
the VF's firmware who holds it (FirmwareLink.set_vf_holders): holders may use
the firmware's Scenario service on that VF (README, "Principals and owned
devices").  Telling never fails an open or a close and never holds one up
for long: a firmware whose link is down is told when it comes back up (of
every device it has holders of, since a restarted firmware knows none), one
that answers an error is logged and told again then too, and one that is
slow to answer gets HOLDERS_WAIT seconds before the open or close goes on
without it.  What a firmware is told is always the holders at the time of
telling, one telling at a time per link, so the last word it gets is the
current one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from fwemu.link.base import FirmwareLink

from .vfio.device import VfioDevice

log = logging.getLogger("vfio-driver")

HOLDERS_WAIT = 2.0  # seconds an open or a close waits for the firmware to take its holders


class Telling:
    """The firmware being told a VF's holders (done at once if there is
    nothing to tell, or its link is down)."""

    def __init__(self, task: asyncio.Task[None] | None = None, vhca_id: int = 0) -> None:
        self.task, self.vhca_id = task, vhca_id

    async def wait(self, timeout: float = HOLDERS_WAIT) -> None:
        """Until the firmware took them, or `timeout` seconds (the telling
        goes on without the caller: a cancelled caller does not stop it)."""
        if self.task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout)
        except TimeoutError:
            log.warning(
                "the firmware has not taken the holders of VF %d in %g s; going on without",
                self.vhca_id,
                timeout,
            )


class DeviceHolders:
    """The opener of every device, and what each firmware was told of them."""

    def __init__(self, links: Sequence[FirmwareLink], *, wait: float = HOLDERS_WAIT) -> None:
        self.wait = wait
        # link -> vhca_id -> the devices of that VF held open, by whom
        self._held: dict[FirmwareLink, dict[int, dict[VfioDevice, str]]] = {}
        self._where: dict[VfioDevice, tuple[FirmwareLink, int]] = {}
        # VFs whose last telling failed (told again when their link comes up)
        self._stale: dict[FirmwareLink, set[int]] = {link: set() for link in links}
        self._locks: dict[FirmwareLink, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        for link in links:
            link.watch_state(functools.partial(self._link_state, link))

    def principals(self, link: FirmwareLink, vhca_id: int) -> frozenset[str]:
        """Who holds the devices of a VF open now."""
        return frozenset(self._held.get(link, {}).get(vhca_id, {}).values())

    async def open(
        self, device: VfioDevice, principal: str, link: FirmwareLink, vhca_id: int
    ) -> Telling:
        """`principal` opens `device` (the VF `vhca_id` of `link`): EBUSY while
        another principal holds it; then the core's open (vfio_df_open); the
        firmware is told on the principal's first open: wait for the Telling
        once the device's fd is installed (a caller cancelled while waiting
        must not leave an open nobody closes)."""
        first = device.group.get(principal)
        try:
            await device.open()
        except BaseException:
            device.group.put(principal)
            raise
        if not first:
            return Telling()
        self._held.setdefault(link, {}).setdefault(vhca_id, {})[device] = principal
        self._where[device] = (link, vhca_id)
        return self._tell(link, vhca_id)

    async def close(self, device: VfioDevice, principal: str) -> None:
        """A device fd of `principal` closed (vfio_df_close); on its last the
        device is free for every principal and the firmware is told."""
        try:
            await device.close()
        finally:
            if device.group.put(principal):
                where = self._where.pop(device, None)
                if where is not None:
                    link, vhca_id = where
                    vfs = self._held[link]
                    del vfs[vhca_id][device]
                    if not vfs[vhca_id]:
                        del vfs[vhca_id]
                    await self._tell(link, vhca_id).wait(self.wait)

    def _tell(self, link: FirmwareLink, vhca_id: int) -> Telling:
        if not link.up:
            self._stale.setdefault(link, set()).add(vhca_id)  # told when it is back
            return Telling()
        return Telling(self._spawn(self._send(link, vhca_id)), vhca_id)

    async def _send(self, link: FirmwareLink, vhca_id: int) -> None:
        lock = self._locks.get(link)
        if lock is None:
            lock = self._locks[link] = asyncio.Lock()
        async with lock:  # one at a time: the last told is the current
            principals = self.principals(link, vhca_id)
            try:
                await link.set_vf_holders(vhca_id, principals)
            except Exception as e:  # never fails an open or a close
                self._stale.setdefault(link, set()).add(vhca_id)
                log.warning(
                    "cannot tell the firmware who holds VF %d: %s (told again when its "
                    "link comes back up)",
                    vhca_id,
                    e,
                )
            else:
                self._stale.get(link, set()).discard(vhca_id)

    def _link_state(self, link: FirmwareLink, up: bool, why: str) -> None:
        """A link that came (back) up is told every VF's holders it may lack."""
        if not up:
            return
        vfs = set(self._held.get(link, {})) | self._stale.get(link, set())
        for vhca_id in sorted(vfs):
            self._spawn(self._send(link, vhca_id))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        """Stop telling (the driver stops; its links close next)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

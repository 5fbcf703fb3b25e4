"""The firmware link to a device model in this process.

The link gets the model (a `fwemu.model.Firmware`) at construction and talks
to it only through `LocalFirmware`, the few methods declared here: the command
path, the scenario path, completions, host memory clean-up and the clock.

Host buffers are plain bytearrays registered with the model: the firmware
writes them directly, so the DMA syncs are no-ops.  With a virtual clock,
`advance_clock` moves time (and runs due completions); with the event loop's
clock, completions arrive on their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from .base import ByteBuffer, FirmwareLink, LinkError, ScenarioLink
from .ifc import Command, CompletionCallback, CreateMkeyIn, DestroyMkeyIn, FirmwareError, R, VfInfo
from .scenario_requests import A, ListVfsIn, ScenarioRequest, SetVfHoldersIn


class LocalFirmware(Protocol):
    """What InProcessLink needs of the model (fwemu.model.Firmware has it)."""

    def exec(self, cmd: Command[R]) -> R: ...

    def control(self, req: ScenarioRequest[A]) -> A: ...

    def next_token(self) -> int: ...

    def subscribe(
        self, callback: CompletionCallback, vhca_ids: Iterable[int] | None = None
    ) -> Callable[[], None]: ...

    def destroy_mkeys_of(self, owner: str) -> int: ...

    async def sleep(self, seconds: float) -> None: ...


class InProcessLink(FirmwareLink, ScenarioLink):
    """FirmwareLink and ScenarioLink over a firmware model in this process."""

    _owners = itertools.count(1)

    def __init__(self, fw: LocalFirmware) -> None:
        super().__init__()
        self.fw = fw
        self._owner = f"inproc-{next(self._owners)}"
        self._unsubscribe = fw.subscribe(self._complete)
        self._closed = False

    # --- FirmwareLink ---------------------------------------------------------

    async def exec(self, cmd: Command[R]) -> R:
        result = self.fw.exec(cmd)
        await self.fw.sleep(result.delay_s)  # an injected DELAY fault
        return result

    def _save_token(self) -> int:
        return self.fw.next_token()

    async def alloc_buffer(self, length: int) -> ByteBuffer:
        if length <= 0:
            raise ValueError("buffer length must be positive")
        data = bytearray(length)
        res = self.fw.exec(CreateMkeyIn(memoryview(data), self._owner))
        if not res.ok:
            raise LinkError(f"CREATE_MKEY failed: {res.diagnostic}")
        return ByteBuffer(res.mkey, data)

    async def free_buffer(self, buf: Any) -> None:
        self.fw.exec(DestroyMkeyIn(buf.mkey))

    async def dma_sync_for_cpu(self, buf: Any, offset: int, length: int) -> None:
        return None

    async def dma_sync_for_device(self, buf: Any, offset: int, length: int) -> None:
        return None

    async def list_vfs(self, function_ids: Sequence[int] = ()) -> list[VfInfo]:
        return await self.control(ListVfsIn(tuple(function_ids)))

    async def set_vf_holders(self, vhca_id: int, principals: frozenset[str]) -> None:
        await self.control(SetVfHoldersIn(vhca_id, frozenset(principals)))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._unsubscribe()
            self.fw.destroy_mkeys_of(self._owner)

    # --- ScenarioLink ---------------------------------------------------------

    async def control(self, req: ScenarioRequest[A]) -> A:
        try:
            return self.fw.control(req)
        except (FirmwareError, ValueError) as e:  # ScenarioError is a ValueError
            raise LinkError(str(e)) from None

"""The firmware link to a device model in this process.

The link gets the model (a `fwemu.model.Firmware`) at construction and talks
to it only through `LocalFirmware`, the few methods declared here: the command
path, completions, host memory clean-up, the clock and the scenario side.

Host buffers are plain bytearrays registered with the model: the firmware
writes them directly, so the DMA syncs are no-ops.  With a virtual clock,
`advance_clock` moves time (and runs due completions); with the event loop's
clock, completions arrive on their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from .base import ByteBuffer, FirmwareLink, LinkError
from .ifc import (
    CmdResult,
    Command,
    CompletionCallback,
    CreateMkeyIn,
    DestroyMkeyIn,
    Fault,
    FirmwareError,
    VfConfig,
    VfInfo,
    obj_type_index,
)

R = TypeVar("R", bound=CmdResult)
T = TypeVar("T")


class _Function(Protocol):
    @property
    def vhca_id(self) -> int: ...


class LocalFirmware(Protocol):
    """What InProcessLink needs of the model (fwemu.model.Firmware has it)."""

    def exec(self, cmd: Command[R]) -> R: ...

    def next_token(self) -> int: ...

    def subscribe(
        self, callback: CompletionCallback, vhca_ids: Iterable[int] | None = None
    ) -> Callable[[], None]: ...

    def destroy_mkeys_of(self, owner: str) -> int: ...

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def advance_clock(self, seconds: float) -> float: ...

    def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> Sequence[_Function]: ...

    def remove_vf(self, vhca_id: int) -> None: ...

    def configure_vf(self, vhca_id: int, **changes: Any) -> _Function: ...

    def info(self, vhca_id: int) -> VfInfo: ...

    def list_vfs(self) -> list[VfInfo]: ...

    def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[int, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int: ...

    def inject_fault(self, vhca_id: int, fault: Fault) -> int: ...

    def clear_faults(self, vhca_id: int) -> int: ...

    def digest(self, vhca_id: int) -> str: ...

    def apply_scenario(self, text: str) -> Sequence[_Function]: ...


def _refused(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """A scenario call; a request the firmware refuses is a LinkError."""
    try:
        return fn(*args, **kw)
    except (FirmwareError, ValueError) as e:  # ScenarioError is a ValueError
        raise LinkError(str(e)) from None


class InProcessLink(FirmwareLink):
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

    async def list_vfs(self) -> list[VfInfo]:
        return self.fw.list_vfs()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._unsubscribe()
            self.fw.destroy_mkeys_of(self._owner)

    # --- ScenarioLink ---------------------------------------------------------

    async def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[VfInfo]:
        return [self.fw.info(v.vhca_id) for v in _refused(self.fw.create_vfs, count, config)]

    async def remove_vf(self, vhca_id: int) -> None:
        _refused(self.fw.remove_vf, vhca_id)

    async def configure_vf(self, vhca_id: int, **changes: Any) -> VfInfo:
        return self.fw.info(_refused(self.fw.configure_vf, vhca_id, **changes).vhca_id)

    async def get_vf(self, vhca_id: int) -> VfInfo:
        return _refused(self.fw.info, vhca_id)

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int:
        specs = _refused(lambda: [(obj_type_index(t), s) for t, s in objects or []])
        return _refused(
            self.fw.reconfigure,
            vhca_id,
            specs,
            at_time=at_time,
            after_saved_bytes=after_saved_bytes,
        )

    async def inject_fault(self, vhca_id: int, fault: Fault) -> int:
        return _refused(self.fw.inject_fault, vhca_id, fault)

    async def clear_faults(self, vhca_id: int) -> int:
        return _refused(self.fw.clear_faults, vhca_id)

    async def digest(self, vhca_id: int) -> str:
        return _refused(self.fw.digest, vhca_id)

    async def apply_scenario(self, text: str) -> list[VfInfo]:
        try:
            created = self.fw.apply_scenario(text)
        except ValueError as e:  # fwemu.scenario.ScenarioError
            raise LinkError(str(e)) from None
        return [self.fw.info(v.vhca_id) for v in created]

    async def now(self) -> float:
        return self.fw.now()

    async def advance_clock(self, seconds: float) -> float:
        return _refused(self.fw.advance_clock, seconds)

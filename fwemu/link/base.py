"""The one interface through which a driver talks to the firmware.

Two implementations: `InProcessLink` calls a `Firmware` model in this process
(embedded mode, unit tests); `GrpcLink` talks to a `fwemu serve` process.  Both
pass the same behaviour tests (tests/fwemu).

Commands mirror the mailbox: they take vhca_id, op_mod, mkey, size... and
answer with the outbox status/syndrome as data.  SAVE_VHCA_STATE is
asynchronous like mlx5_cmd_exec_cb(): the call returns once the firmware
accepted the command and `callback` runs later with the completion.

Host memory: `alloc_buffer` gives a buffer the driver owns, registered with the
firmware under an mkey.  After the firmware wrote it (SAVE completion) call
`dma_sync_for_cpu` before reading it; after writing it, `dma_sync_for_device`
before LOAD.  With memory the firmware can reach directly (in-process, or
shared memory on one host) those are no-ops; across hosts they move bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .ifc import (
    CmdResult,
    Fault,
    HcaCapResult,
    PageTrackResult,
    QueryResult,
    SaveAccepted,
    SaveCompletion,
    VfConfig,
    VfInfo,
)

CompletionCallback = Callable[[SaveCompletion], None]


class HostBuffer(Protocol):
    """Driver-owned memory the firmware reaches through an mkey."""

    @property
    def mkey(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def view(self) -> memoryview:
        """The CPU's view of the bytes (valid until the buffer is freed)."""
        ...


@dataclass(eq=False)
class ByteBuffer:
    """A HostBuffer whose CPU side is a bytearray: the in-process model's
    memory, or the local copy of memory the firmware holds on another host."""

    mkey: int
    data: bytearray = field(repr=False)

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def view(self) -> memoryview:
        return memoryview(self.data)


class FirmwareLink(Protocol):
    """Firmware commands as the mlx5 core exposes them to mlx5vf."""

    async def query_hca_cap(
        self, *, op_mod: int, other_function: bool = True, function_id: int = 0
    ) -> HcaCapResult: ...

    async def query_vhca_migration_state(
        self, vhca_id: int, *, op_mod: int = 0, incremental: bool = False, chunk: bool = False
    ) -> QueryResult: ...

    async def save_vhca_state(
        self,
        vhca_id: int,
        *,
        mkey: int,
        size: int,
        incremental: bool = False,
        set_track: bool = False,
        va: int = 0,
        op_mod: int = 0,
        callback: CompletionCallback,
    ) -> SaveAccepted: ...

    async def load_vhca_state(
        self, vhca_id: int, *, mkey: int, size: int, va: int = 0, op_mod: int = 0
    ) -> CmdResult: ...

    async def suspend_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult: ...

    async def resume_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult: ...

    async def function_level_reset(self, vhca_id: int) -> CmdResult: ...

    async def create_page_tracker(
        self, vhca_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackResult: ...

    async def report_page_tracker(
        self, vhca_id: int, obj_id: int, iova: int, length: int
    ) -> PageTrackResult: ...

    async def destroy_page_tracker(self, vhca_id: int, obj_id: int) -> CmdResult: ...

    async def alloc_buffer(self, length: int) -> HostBuffer: ...

    async def free_buffer(self, buf: HostBuffer) -> None: ...

    async def dma_sync_for_cpu(self, buf: HostBuffer, offset: int, length: int) -> None: ...

    async def dma_sync_for_device(self, buf: HostBuffer, offset: int, length: int) -> None: ...

    async def list_vfs(self) -> list[VfInfo]:
        """The VFs the PF has (what SR-IOV tells the kernel): a driver probes these."""
        ...

    async def close(self) -> None: ...


class ScenarioLink(Protocol):
    """Scenario control: what a test or an operator does to the emulated VFs."""

    async def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[VfInfo]: ...

    async def remove_vf(self, vhca_id: int) -> None: ...

    async def configure_vf(self, vhca_id: int, **changes: Any) -> VfInfo:
        """Change VfConfig fields (not size) of a live VF."""
        ...

    async def get_vf(self, vhca_id: int) -> VfInfo: ...

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int: ...

    async def inject_fault(self, vhca_id: int, fault: Fault) -> int: ...

    async def clear_faults(self, vhca_id: int) -> int: ...

    async def digest(self, vhca_id: int) -> str: ...

    async def apply_scenario(self, text: str) -> list[VfInfo]: ...

    async def now(self) -> float: ...

    async def advance_clock(self, seconds: float) -> float: ...


class LinkError(Exception):
    """A scenario request refused, or the firmware unreachable."""

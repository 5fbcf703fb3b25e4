"""The firmware link to a Firmware model in this process.

Host buffers are plain bytearrays registered with the model: the firmware
writes them directly, so the DMA syncs are no-ops.  With a VirtualClock,
`advance_clock` moves time (and runs due completions); with the event loop's
clock, completions arrive on their own.
"""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

from ..model.clock import VirtualClock, sleep
from ..model.firmware import Firmware, vf_info
from ..scenario import ScenarioError, apply_scenario, parse_scenario
from .base import ByteBuffer, CompletionCallback, LinkError
from .ifc import (
    CmdResult,
    Fault,
    FirmwareError,
    HcaCapResult,
    PageTrackResult,
    QueryResult,
    SaveAccepted,
    SaveCompletion,
    VfConfig,
    VfInfo,
    obj_type_index,
)

R = TypeVar("R", bound=CmdResult)


class InProcessLink:
    """FirmwareLink and ScenarioLink over a Firmware object."""

    _owners = itertools.count(1)

    def __init__(self, fw: Firmware) -> None:
        self.fw = fw
        self._owner = f"inproc-{next(self._owners)}"
        self._callbacks: dict[int, CompletionCallback] = {}
        self._unsubscribe = fw.subscribe(self._on_completion)
        self._closed = False

    def _on_completion(self, c: SaveCompletion) -> None:
        cb = self._callbacks.pop(c.token, None)
        if cb is not None:
            cb(c)

    async def _answer(self, result: R) -> R:
        await sleep(self.fw.clock, result.delay_s)  # an injected DELAY fault
        return result

    # --- FirmwareLink ---------------------------------------------------------

    async def query_hca_cap(
        self, *, op_mod: int, other_function: bool = True, function_id: int = 0
    ) -> HcaCapResult:
        return await self._answer(self.fw.query_hca_cap(op_mod, other_function, function_id))

    async def query_vhca_migration_state(
        self, vhca_id: int, *, op_mod: int = 0, incremental: bool = False, chunk: bool = False
    ) -> QueryResult:
        return await self._answer(
            self.fw.query_vhca_migration_state(
                vhca_id, op_mod=op_mod, incremental=incremental, chunk=chunk
            )
        )

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
    ) -> SaveAccepted:
        token = self.fw.next_token()
        self._callbacks[token] = callback
        res = self.fw.save_vhca_state(
            vhca_id,
            op_mod=op_mod,
            incremental=incremental,
            set_track=set_track,
            va=va,
            mkey=mkey,
            size=size,
            token=token,
        )
        if not res.ok:
            self._callbacks.pop(token, None)
        return await self._answer(res)

    async def load_vhca_state(
        self, vhca_id: int, *, mkey: int, size: int, va: int = 0, op_mod: int = 0
    ) -> CmdResult:
        return await self._answer(
            self.fw.load_vhca_state(vhca_id, op_mod=op_mod, va=va, mkey=mkey, size=size)
        )

    async def suspend_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult:
        return await self._answer(self.fw.suspend_vhca(vhca_id, op_mod))

    async def resume_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult:
        return await self._answer(self.fw.resume_vhca(vhca_id, op_mod))

    async def function_level_reset(self, vhca_id: int) -> CmdResult:
        return self.fw.function_level_reset(vhca_id)

    async def create_page_tracker(
        self, vhca_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackResult:
        return self.fw.create_page_tracker(vhca_id, ranges, log_page_size)

    async def report_page_tracker(
        self, vhca_id: int, obj_id: int, iova: int, length: int
    ) -> PageTrackResult:
        return self.fw.report_page_tracker(vhca_id, obj_id, iova, length)

    async def destroy_page_tracker(self, vhca_id: int, obj_id: int) -> CmdResult:
        return self.fw.destroy_page_tracker(vhca_id, obj_id)

    async def alloc_buffer(self, length: int) -> ByteBuffer:
        if length <= 0:
            raise ValueError("buffer length must be positive")
        data = bytearray(length)
        res = self.fw.create_mkey(memoryview(data), owner=self._owner)
        if not res.ok:
            raise LinkError(f"CREATE_MKEY failed: {res.diagnostic}")
        return ByteBuffer(res.mkey, data)

    async def free_buffer(self, buf: Any) -> None:
        self.fw.destroy_mkey(buf.mkey)

    async def dma_sync_for_cpu(self, buf: Any, offset: int, length: int) -> None:
        return None

    async def dma_sync_for_device(self, buf: Any, offset: int, length: int) -> None:
        return None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._unsubscribe()
            self.fw.destroy_mkeys_of(self._owner)

    # --- ScenarioLink ---------------------------------------------------------

    def _guard(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except (FirmwareError, ValueError) as e:
            raise LinkError(str(e)) from None

    async def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[VfInfo]:
        return [vf_info(v) for v in self._guard(self.fw.create_vfs, count, config)]

    async def remove_vf(self, vhca_id: int) -> None:
        self._guard(self.fw.remove_vf, vhca_id)

    async def configure_vf(self, vhca_id: int, **changes: Any) -> VfInfo:
        return vf_info(self._guard(self.fw.configure_vf, vhca_id, **changes))

    async def get_vf(self, vhca_id: int) -> VfInfo:
        return vf_info(self._guard(self.fw.touch, vhca_id))

    async def list_vfs(self) -> list[VfInfo]:
        return [vf_info(self.fw.touch(v)) for v in sorted(self.fw.vfs)]

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int:
        specs = self._guard(lambda: [(obj_type_index(t), s) for t, s in objects or []])
        return self._guard(  # type: ignore[no-any-return]
            self.fw.reconfigure,
            vhca_id,
            specs,
            at_time=at_time,
            after_saved_bytes=after_saved_bytes,
        )

    async def inject_fault(self, vhca_id: int, fault: Fault) -> int:
        return self._guard(self.fw.inject_fault, vhca_id, fault)  # type: ignore[no-any-return]

    async def clear_faults(self, vhca_id: int) -> int:
        return self._guard(self.fw.clear_faults, vhca_id)  # type: ignore[no-any-return]

    async def digest(self, vhca_id: int) -> str:
        return self._guard(self.fw.digest, vhca_id)  # type: ignore[no-any-return]

    async def apply_scenario(self, text: str) -> list[VfInfo]:
        try:
            return [vf_info(v) for v in apply_scenario(self.fw, parse_scenario(text))]
        except ScenarioError as e:
            raise LinkError(str(e)) from None

    async def now(self) -> float:
        return self.fw.clock.now()

    async def advance_clock(self, seconds: float) -> float:
        clock = self.fw.clock
        if not isinstance(clock, VirtualClock):
            raise LinkError("the firmware runs on the real clock; only a virtual clock advances")
        self._guard(clock.advance, seconds)
        return clock.now()

"""The one interface through which a driver talks to the firmware.

Two implementations: `InProcessLink` calls a `Firmware` model in this process
(embedded mode, unit tests); `GrpcLink` talks to a `fwemu serve` process.  Both
pass the same behaviour tests (tests/fwemu).  Each provides one command path,
`exec`, which runs a command's in-struct (fwemu.link.ifc), and one scenario
path, `control`, which runs a scenario request; the methods here build the
in-structs and requests, once for both.

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

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import ifc
from . import scenario_requests as rq
from .ifc import (
    CmdResult,
    CmdStatus,
    Command,
    CompletionCallback,
    Fault,
    HcaCapResult,
    PageTrackResult,
    QueryResult,
    R,
    ReconfigMode,
    SaveAccepted,
    SaveCompletion,
    Syndrome,
    VfConfig,
    VfInfo,
)
from .scenario_requests import A, ScenarioRequest


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


class FirmwareLink(abc.ABC):
    """Firmware commands as the mlx5 core exposes them to mlx5vf.

    Each command method builds the command's in-struct (fwemu.link.ifc) and
    sends it through `exec`, the one command path an implementation provides
    (mlx5_cmd_exec()).  SAVE completions come back through `_complete`.
    """

    def __init__(self) -> None:
        # SAVEs waiting for their completion: token -> (vhca_id, callback)
        self._waiting: dict[int, tuple[int, CompletionCallback]] = {}
        # Of those, the ones whose command has not answered yet: an abort
        # leaves them to save_vhca_state, which either raises (no callback)
        # or completes them aborted once accepted (never both).
        self._answering: set[int] = set()
        self._aborts = 0  # how many times the waiting SAVEs were aborted
        self._abort_why = ""
        self._abort_at = 0.0
        self._state_listeners: list[Callable[[bool, str], None]] = []

    @property
    def up(self) -> bool:
        """Whether SAVE completions can reach this link now (always, in process)."""
        return True

    def watch_state(self, listener: Callable[[bool, str], None]) -> None:
        """`listener(up, why)` runs each time the link goes down or comes back."""
        self._state_listeners.append(listener)

    def _state_changed(self, up: bool, why: str) -> None:
        for listener in list(self._state_listeners):
            listener(up, why)

    @abc.abstractmethod
    async def exec(self, cmd: Command[R]) -> R:
        """Run one command: its outbox (after an injected DELAY, if any)."""

    @abc.abstractmethod
    def _save_token(self) -> int:
        """A token no other SAVE in flight on this firmware has."""

    async def query_hca_cap(
        self, *, op_mod: int, other_function: bool = True, function_id: int = 0
    ) -> HcaCapResult:
        return await self.exec(ifc.QueryHcaCapIn(op_mod, other_function, function_id))

    async def query_vhca_migration_state(
        self, vhca_id: int, *, op_mod: int = 0, incremental: bool = False, chunk: bool = False
    ) -> QueryResult:
        return await self.exec(ifc.QueryVhcaMigrationStateIn(vhca_id, op_mod, incremental, chunk))

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
        """Like mlx5_cmd_exec_cb(): `callback` gets the completion of an accepted SAVE."""
        token = self._save_token()
        self._waiting[token] = (vhca_id, callback)
        self._answering.add(token)
        aborts = self._aborts
        cmd = ifc.SaveVhcaStateIn(vhca_id, op_mod, incremental, set_track, va, mkey, size, token)
        try:
            res = await self.exec(cmd)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        finally:
            self._answering.discard(token)
        if not res.ok:
            self._waiting.pop(token, None)
        elif self._aborts != aborts and token in self._waiting:
            # Accepted by a firmware whose completions were lost meanwhile.
            self._abort({token: self._waiting.pop(token)}, self._abort_why, self._abort_at)
        return res

    def _complete(self, c: SaveCompletion) -> None:
        entry = self._waiting.get(c.token)
        if entry is not None and entry[0] == c.vhca_id:
            del self._waiting[c.token]
            entry[1](c)

    def _abort_waiting(self, why: str, now: float = 0.0) -> None:
        """Complete every waiting SAVE with INT_ERR/ABORTED: no caller waits
        forever.  (A SAVE whose command has not answered yet is save_vhca_state's.)"""
        self._aborts += 1
        self._abort_why, self._abort_at = why, now
        gone = [t for t in self._waiting if t not in self._answering]
        self._abort({t: self._waiting.pop(t) for t in gone}, why, now)

    @staticmethod
    def _abort(
        waiting: dict[int, tuple[int, CompletionCallback]], why: str, now: float = 0.0
    ) -> None:
        for token, (vhca_id, cb) in waiting.items():
            cb(SaveCompletion(token, vhca_id, CmdStatus.INT_ERR, Syndrome.ABORTED, 0, 0, now, why))

    async def load_vhca_state(
        self, vhca_id: int, *, mkey: int, size: int, va: int = 0, op_mod: int = 0
    ) -> CmdResult:
        return await self.exec(ifc.LoadVhcaStateIn(vhca_id, op_mod, va, mkey, size))

    async def suspend_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult:
        return await self.exec(ifc.SuspendVhcaIn(vhca_id, op_mod))

    async def resume_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult:
        return await self.exec(ifc.ResumeVhcaIn(vhca_id, op_mod))

    async def function_level_reset(self, vhca_id: int) -> CmdResult:
        return await self.exec(ifc.FunctionLevelResetIn(vhca_id))

    async def create_page_tracker(
        self, vhca_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackResult:
        return await self.exec(ifc.CreatePageTrackIn(vhca_id, tuple(ranges), log_page_size))

    async def report_page_tracker(
        self, vhca_id: int, obj_id: int, iova: int, length: int
    ) -> PageTrackResult:
        return await self.exec(ifc.ModifyPageTrackIn(vhca_id, obj_id, iova, length))

    async def destroy_page_tracker(self, vhca_id: int, obj_id: int) -> CmdResult:
        return await self.exec(ifc.DestroyPageTrackIn(vhca_id, obj_id))

    @abc.abstractmethod
    async def alloc_buffer(self, length: int) -> HostBuffer: ...

    @abc.abstractmethod
    async def free_buffer(self, buf: HostBuffer) -> None: ...

    @abc.abstractmethod
    async def dma_sync_for_cpu(self, buf: HostBuffer, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    async def dma_sync_for_device(self, buf: HostBuffer, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    async def list_vfs(self, function_ids: Sequence[int] = ()) -> list[VfInfo]:
        """The VFs the PF has (what SR-IOV tells the kernel): a driver probes
        these; with `function_ids`, those functions' only (a device node
        opened: the VF in its slot now, without a look at every other)."""

    @abc.abstractmethod
    async def set_vf_holders(self, vhca_id: int, principals: frozenset[str]) -> None:
        """Tell the firmware which principals hold the device of a VF open (an
        emulator extension, no mlx5 command): they may use Scenario on it
        (README, "Security").  The driver says it on each first open and last
        close by a principal, and again for every VF after a reconnect."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class ScenarioLink(abc.ABC):
    """Scenario control: what a test or an operator does to the emulated VFs.

    Each method builds its request (fwemu.link.ifc) and sends it through
    `control`, the one scenario path an implementation provides.
    """

    @abc.abstractmethod
    async def control(self, req: ScenarioRequest[A]) -> A:
        """Run one scenario request: its answer; a refused request raises LinkError."""

    async def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[VfInfo]:
        return await self.control(rq.CreateVfsIn(count, config))

    async def remove_vf(self, vhca_id: int) -> None:
        await self.control(rq.RemoveVfIn(vhca_id))

    async def configure_vf(self, vhca_id: int, /, **changes: Any) -> VfInfo:
        """Change VfConfig fields (not size) of a live VF."""
        return await self.control(rq.ConfigureVfIn(vhca_id, changes))

    async def get_vf(self, vhca_id: int) -> VfInfo:
        return await self.control(rq.GetVfIn(vhca_id))

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
        mode: int = ReconfigMode.ADD,
    ) -> int:
        """`mode`: ADD, REPLACE or REMOVE (fwemu.link.ifc.ReconfigMode)."""
        if at_time is not None and after_saved_bytes is not None:
            raise LinkError("give a time or a byte count, not both")
        req = rq.ReconfigureIn(vhca_id, tuple(objects or ()), at_time, after_saved_bytes, mode)
        return await self.control(req)

    async def reset_vf(self, vhca_id: int) -> VfInfo:
        """The VF back to the state it was created in (README, "Scenario files")."""
        return await self.control(rq.ResetVfIn(vhca_id))

    async def inject_fault(self, vhca_id: int, fault: Fault) -> int:
        return await self.control(rq.InjectFaultIn(vhca_id, fault))

    async def clear_faults(self, vhca_id: int) -> int:
        return await self.control(rq.ClearFaultsIn(vhca_id))

    async def digest(self, vhca_id: int, *, suspended: bool = False) -> str:
        return await self.control(rq.GetDigestIn(vhca_id, suspended))

    async def apply_scenario(self, text: str) -> list[VfInfo]:
        return await self.control(rq.ApplyScenarioIn(text))

    async def now(self) -> float:
        return await self.control(rq.GetClockIn())

    async def advance_clock(self, seconds: float) -> float:
        return await self.control(rq.AdvanceClockIn(seconds))


class LinkError(Exception):
    """A scenario request refused, or the firmware unreachable."""

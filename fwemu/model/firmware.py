"""The emulated firmware of one PF with many VFs, as one object: the firmware
commands (each through the one command path, pipeline.py), host memory,
completions, the scenario side and the clock.

Pure Python; the gRPC face (fwemu.service) and the in-process link
(fwemu.link.inproc) both call this.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, cast

from ..link import ifc
from ..link import scenario_requests as rq
from ..link.ifc import (
    CmdResult,
    CmdStatus,
    Command,
    CompletionCallback,
    Fault,
    FirmwareError,
    HcaCapResult,
    MkeyResult,
    PageTrackResult,
    QueryResult,
    R,
    SaveAccepted,
    Syndrome,
    VfConfig,
    VfInfo,
)
from ..link.scenario_requests import A
from . import control
from .clock import VirtualClock, sleep
from .control import vf_info
from .memory import OutOfMemory
from .pipeline import exec_command
from .state import FirmwareState
from .vf import Vf

__all__ = ["Firmware", "vf_info"]


class Firmware(FirmwareState):
    """Many VFs behind one firmware command interface."""

    # --- commands --------------------------------------------------------------

    def exec(self, cmd: Command[R]) -> R:
        """Run one command (an in-struct of fwemu.link.ifc): its outbox."""
        return exec_command(self, cmd)

    def next_token(self) -> int:
        """A fresh command token, for callers that correlate completions."""
        return next(self.tokens)

    def query_hca_cap(self, op_mod: int, other_function: bool, function_id: int) -> HcaCapResult:
        return self.exec(ifc.QueryHcaCapIn(op_mod, other_function, function_id))

    def suspend_vhca(self, vhca_id: int, op_mod: int) -> CmdResult:
        return self.exec(ifc.SuspendVhcaIn(vhca_id, op_mod))

    def resume_vhca(self, vhca_id: int, op_mod: int) -> CmdResult:
        return self.exec(ifc.ResumeVhcaIn(vhca_id, op_mod))

    def query_vhca_migration_state(
        self, vhca_id: int, op_mod: int = 0, incremental: bool = False, chunk: bool = False
    ) -> QueryResult:
        return self.exec(ifc.QueryVhcaMigrationStateIn(vhca_id, op_mod, incremental, chunk))

    def save_vhca_state(
        self,
        vhca_id: int,
        *,
        op_mod: int = 0,
        incremental: bool = False,
        set_track: bool = False,
        va: int = 0,
        mkey: int = 0,
        size: int = 0,
        token: int = 0,
    ) -> SaveAccepted:
        return self.exec(
            ifc.SaveVhcaStateIn(vhca_id, op_mod, incremental, set_track, va, mkey, size, token)
        )

    def load_vhca_state(
        self, vhca_id: int, *, op_mod: int = 0, va: int = 0, mkey: int = 0, size: int = 0
    ) -> CmdResult:
        return self.exec(ifc.LoadVhcaStateIn(vhca_id, op_mod, va, mkey, size))

    def create_page_tracker(
        self, vhca_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackResult:
        return self.exec(ifc.CreatePageTrackIn(vhca_id, tuple(ranges), log_page_size))

    def report_page_tracker(
        self, vhca_id: int, obj_id: int, iova: int, length: int
    ) -> PageTrackResult:
        return self.exec(ifc.ModifyPageTrackIn(vhca_id, obj_id, iova, length))

    def destroy_page_tracker(self, vhca_id: int, obj_id: int) -> CmdResult:
        return self.exec(ifc.DestroyPageTrackIn(vhca_id, obj_id))

    def function_level_reset(self, vhca_id: int) -> CmdResult:
        return self.exec(ifc.FunctionLevelResetIn(vhca_id))

    # --- host memory -------------------------------------------------------------

    def create_mkey(
        self, view: memoryview, owner: str = "", principal: str | None = None
    ) -> MkeyResult:
        """An mkey over `view`, `principal`'s (fwemu.link.ifc); `owner` names
        who cleans it up (destroy_mkeys_of)."""
        return self.exec(ifc.CreateMkeyIn(view, owner, principal))

    def create_held_mkey(
        self, length: int, owner: str = "", principal: str | None = None
    ) -> MkeyResult:
        """An mkey over `length` zero bytes the firmware holds (for a driver on
        another host), charged to the memory limit until it is destroyed:
        beyond it, LIM_ERR / NO_MEMORY."""
        try:
            view = self.mkeys.allocate(length)
        except OutOfMemory as e:
            return MkeyResult(
                status=CmdStatus.LIM_ERR, syndrome=Syndrome.NO_MEMORY, diagnostic=str(e)
            )
        r = self.create_mkey(view, owner, principal)
        if r.ok:
            self.mkeys.hold(r.mkey, length)
        else:
            self.memory.credit(length)
        return r

    def destroy_mkey(self, mkey: int, principal: str | None = None) -> CmdResult:
        return self.exec(ifc.DestroyMkeyIn(mkey, principal))

    def destroy_mkeys_of(self, owner: str) -> int:
        return self.mkeys.destroy_owned(owner)

    def mkey_view(self, mkey: int) -> memoryview | None:
        """The memory of `mkey`, whoever's it is (the firmware's own view)."""
        return self.mkeys.view(mkey)

    def mkey_range(
        self, mkey: int, offset: int, length: int, principal: str | None = None
    ) -> memoryview | CmdResult:
        """Bytes [offset, + length) of `principal`'s mkey (ReadMkey, WriteMkey),
        or the failure a command naming that range gets."""
        return self.mkeys.host_range(mkey, offset, length, principal)

    # --- completions (the command EQ) ------------------------------------------------

    def subscribe(
        self, callback: CompletionCallback, vhca_ids: Iterable[int] | None = None
    ) -> Callable[[], None]:
        """Receive SAVE completions (backlogged ones first).  Returns unsubscribe."""
        return self.events.subscribe(callback, vhca_ids)

    # --- scenario side ---------------------------------------------------------------

    def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[Vf]:
        return control.create_vfs(self, count, config)

    def remove_vf(self, vhca_id: int) -> None:
        control.remove_vf(self, vhca_id)

    def configure_vf(self, vhca_id: int, **changes: object) -> Vf:
        return control.configure_vf(self, vhca_id, changes)

    def reset_vf(self, vhca_id: int) -> Vf:
        """The VF back to the state it was created in (control.reset_vf)."""
        return control.reset_vf(self, vhca_id)

    def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[int, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
        mode: int = ifc.ReconfigMode.ADD,
    ) -> int:
        """Schedule (or run now) a reconfiguration; returns its trigger id."""
        return control.reconfigure(self, vhca_id, objects or [], at_time, after_saved_bytes, mode)

    def reconfig_runs_now(
        self, vhca_id: int, at_time: float | None, after_saved_bytes: int | None
    ) -> bool:
        """Whether a reconfiguration asked for now would run at once."""
        return control.reconfig_runs_now(self, vhca_id, at_time, after_saved_bytes)

    def cancel_reconfigure(self, vhca_id: int, trigger_id: int) -> bool:
        return control.cancel_reconfigure(self, vhca_id, trigger_id)

    def inject_fault(self, vhca_id: int, fault: Fault) -> int:
        return control.inject_fault(self, vhca_id, fault)

    def disarm_fault(self, vhca_id: int, fault_id: int) -> bool:
        return control.disarm_fault(self, vhca_id, fault_id)

    def clear_faults(self, vhca_id: int) -> int:
        return self.vf(vhca_id).faults.clear()

    def touch(self, vhca_id: int) -> Vf:
        """The VF brought up to the current time (for inspection)."""
        return control.touch(self, vhca_id)

    def digest(self, vhca_id: int, *, suspended: bool = False) -> str:
        vf = self.touch(vhca_id)
        return vf.suspended_digest() if suspended else vf.digest()

    def info(self, vhca_id: int) -> VfInfo:
        """A snapshot of the VF brought up to the current time."""
        return vf_info(self.touch(vhca_id))

    def list_vfs(
        self, function_ids: Collection[int] = (), visible: Callable[[int], bool] | None = None
    ) -> list[VfInfo]:
        """Every VF's snapshot; with `function_ids`, those VFs' only; with
        `visible` (of a vhca_id), those it allows only.  A VF left out is not
        brought up to the current time."""
        wanted = frozenset(function_ids)
        return [
            self.info(v)
            for v, vf in sorted(self.vfs.items())
            if (not wanted or vf.function_id in wanted) and (visible is None or visible(v))
        ]

    def apply_scenario(self, text: str) -> list[Vf]:
        """Apply a scenario file's text (fwemu.scenario); ScenarioError if it is bad."""
        # fwemu.scenario builds Firmwares, so it is imported here, not at the top.
        from ..scenario import apply_scenario, parse_scenario

        return apply_scenario(self, parse_scenario(text))

    def control(self, req: rq.ScenarioRequest[A]) -> A:
        """Run one scenario request (fwemu.link.ifc): its answer, in interface
        types; a refused one raises FirmwareError or ValueError."""
        req.validate()
        return cast(A, _CONTROL[type(req)](self, req))

    # --- time ----------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.now()

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of firmware time (an injected DELAY fault)."""
        await sleep(self.clock, seconds)

    def advance_clock(self, seconds: float) -> float:
        """Move a virtual clock forward (running due completions): the new time."""
        if not isinstance(self.clock, VirtualClock):
            raise FirmwareError(
                "the firmware runs on the real clock; only a virtual clock advances"
            )
        self.clock.advance(seconds)
        return self.clock.now()


# The scenario side's one path: each request to the method that answers it.
_CONTROL: dict[type[rq.ScenarioRequest[Any]], Callable[[Firmware, Any], Any]] = {
    rq.CreateVfsIn: lambda fw, r: [fw.info(v.vhca_id) for v in fw.create_vfs(r.count, r.config)],
    rq.RemoveVfIn: lambda fw, r: fw.remove_vf(r.vhca_id),
    rq.ConfigureVfIn: lambda fw, r: fw.info(fw.configure_vf(r.vhca_id, **r.changes).vhca_id),
    rq.GetVfIn: lambda fw, r: fw.info(r.vhca_id),
    rq.ListVfsIn: lambda fw, r: fw.list_vfs(r.function_ids),
    rq.ReconfigureIn: lambda fw, r: fw.reconfigure(
        r.vhca_id,
        [(ifc.obj_type_index(t), size) for t, size in r.objects],
        at_time=r.at_time,
        after_saved_bytes=r.after_saved_bytes,
        mode=r.mode,
    ),
    rq.ResetVfIn: lambda fw, r: fw.info(fw.reset_vf(r.vhca_id).vhca_id),
    rq.InjectFaultIn: lambda fw, r: fw.inject_fault(r.vhca_id, r.fault),
    rq.ClearFaultsIn: lambda fw, r: fw.clear_faults(r.vhca_id),
    rq.GetDigestIn: lambda fw, r: fw.digest(r.vhca_id, suspended=r.suspended),
    rq.SetVfHoldersIn: lambda fw, r: control.set_vf_holders(fw, r.vhca_id, r.principals),
    rq.ApplyScenarioIn: lambda fw, r: [fw.info(v.vhca_id) for v in fw.apply_scenario(r.text)],
    rq.GetClockIn: lambda fw, r: fw.now(),
    rq.AdvanceClockIn: lambda fw, r: fw.advance_clock(r.seconds),
}

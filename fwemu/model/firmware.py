"""The emulated firmware of one PF with many VFs: command execution, host memory
(mkeys), asynchronous SAVE completions, faults and scenario hooks.

Pure Python; the gRPC face (fwemu.service) and the in-process link
(fwemu.link.inproc) both call this.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from ..link.ifc import (
    MAX_U16,
    MAX_U32,
    CapType,
    CmdResult,
    CmdStatus,
    CompletionCallback,
    Fault,
    FaultKind,
    FirmwareError,
    HcaCapResult,
    MkeyResult,
    NoSuchVf,
    Opcode,
    PageTrackResult,
    QueryResult,
    ResumeOpMod,
    SaveAccepted,
    SaveCompletion,
    SuspendOpMod,
    Syndrome,
    VfConfig,
    VfInfo,
    enum_name,
)
from .clock import Clock
from .image import (
    HEADER_SIZE,
    Cursor,
    ImageError,
    ImageHeader,
    ImageKind,
    Plan,
    apply_image,
    parse_image,
    write_piece,
)
from .page_track import PageTracker, PageTrackError
from .stats import FirmwareStats
from .vf import ChunkedSave, LoadChain, ReconfigTrigger, Vf

R = TypeVar("R", bound=CmdResult)

log = logging.getLogger("fwemu.firmware")


@dataclass(slots=True)
class _Subscriber:
    callback: CompletionCallback
    vhca_ids: frozenset[int] | None


def _fail(cls: type[R], status: CmdStatus, syndrome: Syndrome, msg: str) -> R:
    return cls(status=status, syndrome=syndrome, diagnostic=msg)


@dataclass(slots=True)
class _Mkey:
    view: memoryview
    owner: str = ""


class Firmware:
    """Many VFs behind one firmware command interface."""

    MAX_VFS = MAX_U16 - 1
    MAX_MKEYS = 65536
    COMPLETION_BACKLOG = 4096

    def __init__(self, clock: Clock, *, seed: int = 0, defaults: VfConfig | None = None) -> None:
        self.clock = clock
        self.seed = seed
        self.defaults = defaults or VfConfig()
        self.vfs: dict[int, Vf] = {}  # by vhca_id
        self._mkeys: dict[int, _Mkey] = {}
        self._mkey_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._ids = itertools.count(1)
        self._vf_serial = itertools.count(1)
        # Image chains of two firmware instances never match, even with one seed.
        self.instance = secrets.randbits(64)
        self._subscribers: list[_Subscriber] = []
        self._backlog: deque[SaveCompletion] = deque(maxlen=self.COMPLETION_BACKLOG)
        self.stats = FirmwareStats()

    # ======================================================================
    # Scenario side
    # ======================================================================

    def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[Vf]:
        cfg = config or self.defaults
        cfg.validate()
        if count < 1:
            raise FirmwareError("count must be at least 1")
        if len(self.vfs) + count > self.MAX_VFS:
            raise FirmwareError(f"at most {self.MAX_VFS} VFs per firmware")
        created = []
        now = self.clock.now()
        for _ in range(count):
            vf_id = next(i for i in itertools.count() if i + 1 not in self.vfs)
            seed = cfg.seed if cfg.seed is not None else (self.seed * 1_000_003 + vf_id) % (1 << 64)
            try:
                uid = f"{self.instance:016x}-{next(self._vf_serial)}"
                vf = Vf(vf_id, cfg, seed, uid=uid, now=now)
            except MemoryError:
                raise FirmwareError(f"not enough memory for a {cfg.size}-byte VF") from None
            self.vfs[vf.vhca_id] = vf
            created.append(vf)
        return created

    def remove_vf(self, vhca_id: int) -> None:
        vf = self.vf(vhca_id)
        if vf.save_in_flight is not None:
            self._abort_save(vf, "VF removed")
        del self.vfs[vhca_id]
        self.stats.reconfigurations_retired += vf.reconfigurations

    def vf(self, vhca_id: int) -> Vf:
        try:
            return self.vfs[vhca_id]
        except KeyError:
            raise NoSuchVf(f"no VF with vhca_id {vhca_id}") from None

    def configure_vf(self, vhca_id: int, **changes: object) -> Vf:
        vf = self.vf(vhca_id)
        if "size" in changes and changes["size"] != vf.config.size:
            raise FirmwareError("a VF's size is fixed at creation; remove and create it again")
        cfg = vf.with_config(**changes)
        cfg.validate()
        now = self.clock.now()
        vf.advance(now)
        vf.config = cfg
        vf.workload.set_rate(cfg.dirty_bytes_per_s, now)
        return vf

    def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[int, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int:
        """Schedule (or run now) a reconfiguration; returns its trigger id."""
        vf = self.vf(vhca_id)
        for _, size in objects or []:
            if not 1 <= size <= VfConfig.MAX_SIZE:
                raise FirmwareError("object size out of range")
        if at_time is not None and after_saved_bytes is not None:
            raise FirmwareError("give a time or a byte count, not both")
        trig = ReconfigTrigger(next(self._ids), list(objects or []), at_time, after_saved_bytes)
        vf.add_trigger(trig, self.clock.now())
        return trig.trigger_id

    def inject_fault(self, vhca_id: int, fault: Fault) -> int:
        vf = self.vf(vhca_id)
        fault.fault_id = next(self._ids)
        try:
            vf.faults.add(fault)
        except ValueError as e:
            raise FirmwareError(str(e)) from None
        self.stats.faults_injected[fault.kind.name.lower()] += 1
        return fault.fault_id

    def clear_faults(self, vhca_id: int) -> int:
        return self.vf(vhca_id).faults.clear()

    def digest(self, vhca_id: int) -> str:
        vf = self.vf(vhca_id)
        vf.advance(self.clock.now())
        return vf.digest()

    def touch(self, vhca_id: int) -> Vf:
        """The VF brought up to the current time (for inspection)."""
        vf = self.vf(vhca_id)
        vf.advance(self.clock.now())
        return vf

    # ======================================================================
    # Host memory
    # ======================================================================

    def create_mkey(self, view: memoryview, owner: str = "") -> MkeyResult:
        if view.readonly:
            return _fail(
                MkeyResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.FIELD_RANGE,
                "host memory must be writable",
            )
        if len(self._mkeys) >= self.MAX_MKEYS:
            return _fail(
                MkeyResult,
                CmdStatus.LIM_ERR,
                Syndrome.TOO_MANY_MKEYS,
                f"at most {self.MAX_MKEYS} mkeys",
            )
        mkey = (next(self._mkey_ids) << 8) & MAX_U32 | 0x42
        self._mkeys[mkey] = _Mkey(view.cast("B"), owner)
        return MkeyResult(mkey=mkey)

    def destroy_mkey(self, mkey: int) -> CmdResult:
        if self._mkeys.pop(mkey, None) is None:
            return _fail(
                CmdResult, CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY, f"no mkey {mkey:#x}"
            )
        return CmdResult()

    def destroy_mkeys_of(self, owner: str) -> int:
        gone = [k for k, m in self._mkeys.items() if m.owner == owner]
        for k in gone:
            del self._mkeys[k]
        return len(gone)

    def mkey_view(self, mkey: int) -> memoryview | None:
        m = self._mkeys.get(mkey)
        return m.view if m else None

    def _host_range(self, mkey: int, va: int, size: int) -> memoryview | CmdResult:
        m = self._mkeys.get(mkey)
        if m is None:
            return _fail(
                CmdResult, CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY, f"no mkey {mkey:#x}"
            )
        if va < 0 or size < 0:
            return _fail(
                CmdResult, CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, "negative va or size"
            )
        if va + size > len(m.view):
            return _fail(
                CmdResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.MKEY_RANGE,
                f"va {va} + size {size} exceeds mkey {mkey:#x} of {len(m.view)} bytes",
            )
        return m.view[va : va + size]

    # ======================================================================
    # Completions (the command EQ)
    # ======================================================================

    def subscribe(
        self, callback: CompletionCallback, vhca_ids: Iterable[int] | None = None
    ) -> Callable[[], None]:
        """Receive SAVE completions (backlogged ones first).  Returns unsubscribe."""
        sub = _Subscriber(callback, frozenset(vhca_ids) if vhca_ids else None)
        self._subscribers.append(sub)
        keep: deque[SaveCompletion] = deque(maxlen=self.COMPLETION_BACKLOG)
        while self._backlog:
            c = self._backlog.popleft()
            if sub.vhca_ids is None or c.vhca_id in sub.vhca_ids:
                callback(c)
            else:
                keep.append(c)
        self._backlog = keep

        def unsubscribe() -> None:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

        return unsubscribe

    def _deliver(self, c: SaveCompletion) -> None:
        delivered = False
        for sub in list(self._subscribers):
            if sub.vhca_ids is None or c.vhca_id in sub.vhca_ids:
                sub.callback(c)
                delivered = True
        if not delivered:
            self._backlog.append(c)

    # ======================================================================
    # Commands
    # ======================================================================

    def next_token(self) -> int:
        """A fresh command token, for callers that correlate completions."""
        return next(self._tokens)

    def _count(self, opcode: int, result: CmdResult) -> None:
        key = (opcode, result.status)
        self.stats.commands[key] = self.stats.commands.get(key, 0) + 1

    def _lookup(self, vhca_id: int, opcode: int) -> Vf | CmdResult:
        if not 0 <= vhca_id <= MAX_U16:
            return _fail(
                CmdResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.FIELD_RANGE,
                f"vhca_id {vhca_id} does not fit 16 bits",
            )
        vf = self.vfs.get(vhca_id)
        if vf is None:
            return _fail(
                CmdResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.UNKNOWN_VHCA,
                f"no function with vhca_id {vhca_id}",
            )
        if not vf.config.caps.migration_capable() and opcode != Opcode.QUERY_HCA_CAP:
            return _fail(
                CmdResult,
                CmdStatus.BAD_OP_ERR,
                Syndrome.NOT_MIGRATABLE,
                f"vhca_id {vhca_id} does not support migration",
            )
        vf.advance(self.clock.now())
        return vf

    def _injected(self, vf: Vf, opcode: int, cls: type[R]) -> R | None:
        """A FAIL fault for this opcode turns the command into that failure."""
        f = vf.faults.take(FaultKind.FAIL, opcode)
        if f is None:
            return None
        if f.in_completion:  # only SAVE; the caller handles it
            vf.faults.faults.insert(
                0,
                Fault(
                    FaultKind.FAIL,
                    opcode,
                    f.status,
                    f.syndrome,
                    count=1,
                    in_completion=True,
                    fault_id=f.fault_id,
                ),
            )
            return None
        return cls(status=f.status, syndrome=f.syndrome, diagnostic="injected fault")

    def _delay(self, vf: Vf, opcode: int, result: R) -> R:
        f = vf.faults.take(FaultKind.DELAY, opcode)
        if f is not None:
            result.delay_s += f.delay_s
        return result

    def _finish(self, vf: Vf | None, opcode: int, result: R) -> R:
        if vf is not None:
            result = self._delay(vf, opcode, result)
        self._count(opcode, result)
        if result.status != CmdStatus.OK:
            log.info(
                "command failed: %s",
                result.diagnostic,
                extra={
                    "vhca_id": vf.vhca_id if vf is not None else None,
                    "opcode": enum_name(Opcode, opcode),
                    "status": enum_name(CmdStatus, result.status),
                    "syndrome": enum_name(Syndrome, result.syndrome),
                },
            )
        elif opcode in (Opcode.SUSPEND_VHCA, Opcode.RESUME_VHCA) and vf is not None:
            log.info(
                "function %s",
                "running" if vf.running else "suspended",
                extra={
                    "vhca_id": vf.vhca_id,
                    "opcode": enum_name(Opcode, opcode),
                    "initiator_suspended": vf.initiator_suspended,
                    "responder_suspended": vf.responder_suspended,
                },
            )
        return result

    # --- QUERY_HCA_CAP --------------------------------------------------------

    def query_hca_cap(self, op_mod: int, other_function: bool, function_id: int) -> HcaCapResult:
        cap_type = op_mod >> 1
        if op_mod > MAX_U16 or cap_type not in (CapType.GENERAL_DEVICE, CapType.GENERAL_DEVICE_2):
            r = _fail(
                HcaCapResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.BAD_OP_MOD,
                f"op_mod {op_mod:#x} names no capability this firmware has",
            )
            self._count(Opcode.QUERY_HCA_CAP, r)
            return r
        if not other_function:
            # The PF itself: it supports everything and has vhca_id 0.
            res = HcaCapResult(
                cap_type=cap_type,
                vhca_id=0,
                migration=True,
                adv_virtualization=True,
                migration_multi_load=True,
                migration_tracking_state=True,
                migration_in_chunks=True,
                migration_state=True,
            )
            self._count(Opcode.QUERY_HCA_CAP, res)
            return res
        vf = next((v for v in self.vfs.values() if v.function_id == function_id), None)
        if vf is None:
            r = _fail(
                HcaCapResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.UNKNOWN_VHCA,
                f"no VF with function_id {function_id}",
            )
            self._count(Opcode.QUERY_HCA_CAP, r)
            return r
        c = vf.config.caps
        res = HcaCapResult(
            cap_type=cap_type,
            vhca_id=vf.vhca_id,
            migration=c.migration,
            adv_virtualization=c.adv_virtualization,
            migratable=c.migratable,
            migration_multi_load=c.migration_multi_load,
            migration_tracking_state=c.migration_tracking_state,
            migration_in_chunks=c.migration_in_chunks,
            migration_state=c.migration_state,
        )
        self._count(Opcode.QUERY_HCA_CAP, res)
        return res

    # --- SUSPEND_VHCA / RESUME_VHCA --------------------------------------------

    def suspend_vhca(self, vhca_id: int, op_mod: int) -> CmdResult:
        op = Opcode.SUSPEND_VHCA
        vf = self._lookup(vhca_id, op)
        if isinstance(vf, CmdResult):
            return self._finish(None, op, vf)
        result = self._injected(vf, op, CmdResult) or self._suspend(vf, op_mod)
        return self._finish(vf, op, result)

    def _suspend(self, vf: Vf, op_mod: int) -> CmdResult:
        if op_mod not in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
            return _fail(
                CmdResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.BAD_OP_MOD,
                f"SUSPEND_VHCA op_mod {op_mod} (0 INITIATOR, 1 RESPONDER)",
            )
        if vf.save_in_flight is not None:
            return _fail(
                CmdResult,
                CmdStatus.RES_BUSY,
                Syndrome.SAVE_IN_FLIGHT,
                "a SAVE_VHCA_STATE is in flight",
            )
        now = self.clock.now()
        if op_mod == SuspendOpMod.SUSPEND_INITIATOR:
            if vf.initiator_suspended:
                return _fail(
                    CmdResult,
                    CmdStatus.BAD_RES_STATE_ERR,
                    Syndrome.ALREADY_SUSPENDED,
                    "initiator already suspended",
                )
            vf.set_suspended(initiator=True, responder=vf.responder_suspended, now=now)
        else:
            if not vf.initiator_suspended:
                return _fail(
                    CmdResult,
                    CmdStatus.BAD_RES_STATE_ERR,
                    Syndrome.INITIATOR_RUNNING,
                    "suspend the initiator (op_mod 0) before the responder",
                )
            if vf.responder_suspended:
                return _fail(
                    CmdResult,
                    CmdStatus.BAD_RES_STATE_ERR,
                    Syndrome.ALREADY_SUSPENDED,
                    "responder already suspended",
                )
            vf.set_suspended(initiator=True, responder=True, now=now)
            vf.loads_since_suspend = 0
        return CmdResult()

    def resume_vhca(self, vhca_id: int, op_mod: int) -> CmdResult:
        op = Opcode.RESUME_VHCA
        vf = self._lookup(vhca_id, op)
        if isinstance(vf, CmdResult):
            return self._finish(None, op, vf)
        result = self._injected(vf, op, CmdResult) or self._resume(vf, op_mod)
        return self._finish(vf, op, result)

    def _resume(self, vf: Vf, op_mod: int) -> CmdResult:
        if op_mod not in (ResumeOpMod.RESUME_RESPONDER, ResumeOpMod.RESUME_INITIATOR):
            return _fail(
                CmdResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.BAD_OP_MOD,
                f"RESUME_VHCA op_mod {op_mod} (0 RESPONDER, 1 INITIATOR)",
            )
        now = self.clock.now()
        if op_mod == ResumeOpMod.RESUME_RESPONDER:
            if not vf.responder_suspended:
                return _fail(
                    CmdResult,
                    CmdStatus.BAD_RES_STATE_ERR,
                    Syndrome.NOT_SUSPENDED,
                    "responder is not suspended",
                )
            vf.set_suspended(initiator=vf.initiator_suspended, responder=False, now=now)
            vf.load_chain = None  # what was loaded is now the running state
        else:
            if vf.responder_suspended:
                return _fail(
                    CmdResult,
                    CmdStatus.BAD_RES_STATE_ERR,
                    Syndrome.RESPONDER_SUSPENDED,
                    "resume the responder (op_mod 0) before the initiator",
                )
            if not vf.initiator_suspended:
                return _fail(
                    CmdResult,
                    CmdStatus.BAD_RES_STATE_ERR,
                    Syndrome.NOT_SUSPENDED,
                    "initiator is not suspended",
                )
            vf.set_suspended(initiator=False, responder=False, now=now)
        vf.advance(now)  # fire reconfigurations that waited for the VF
        return CmdResult()

    # --- QUERY_VHCA_MIGRATION_STATE ---------------------------------------------

    def query_vhca_migration_state(
        self, vhca_id: int, op_mod: int = 0, incremental: bool = False, chunk: bool = False
    ) -> QueryResult:
        op = Opcode.QUERY_VHCA_MIGRATION_STATE
        vf = self._lookup(vhca_id, op)
        if isinstance(vf, CmdResult):
            return self._finish(None, op, _as(QueryResult, vf))
        result = self._injected(vf, op, QueryResult) or self._query(vf, op_mod, incremental, chunk)
        return self._finish(vf, op, result)

    def _query(self, vf: Vf, op_mod: int, incremental: bool, chunk: bool) -> QueryResult:
        if op_mod != 0:
            return _fail(
                QueryResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.BAD_OP_MOD,
                f"op_mod {op_mod} (must be 0)",
            )
        if chunk and not vf.config.caps.migration_in_chunks:
            return _fail(
                QueryResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.CHUNKS_UNSUPPORTED,
                "chunk mode needs cmd_hca_cap_2.migration_in_chunks",
            )
        mig_state = vf.migration_state() if vf.config.caps.migration_state else 0
        if chunk:
            vf.chunk_armed = True
            if vf.chunked is not None and incremental:
                # What is left of the image being saved (continuations are incremental).
                plan, cur = vf.chunked.plan, vf.chunked.cursor
            else:
                plan, cur = self._plan_for(vf, incremental), Cursor()
            if plan.finished(cur):
                return QueryResult(migration_state=mig_state)
            return QueryResult(
                migration_state=mig_state,
                required_umem_size=self._next_piece_size(vf, plan, cur),
                remaining_total_size=plan.pieces_size(vf.config.chunk_size, cur),
            )
        plan = self._plan_for(vf, incremental)
        # Nothing changed since the last tracked SAVE: nothing to save (mlx5vf
        # issues a SAVE whenever this is above 0).
        size = 0 if plan.empty else plan.image_size()
        if size > MAX_U32:
            return _fail(
                QueryResult,
                CmdStatus.LIM_ERR,
                Syndrome.IMAGE_TOO_LARGE,
                f"a {size}-byte image needs chunk mode",
            )
        return QueryResult(migration_state=mig_state, required_umem_size=size)

    @staticmethod
    def _plan_for(vf: Vf, incremental: bool) -> Plan:
        # Without a tracking session everything would have to be sent.
        return vf.incremental_plan() if incremental and vf.tracking else vf.full_plan()

    # --- SAVE_VHCA_STATE --------------------------------------------------------

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
        """Accept a SAVE (status 0) or refuse it.  An accepted SAVE writes its
        image into host memory now and completes after latency + size/bandwidth
        with a SaveCompletion delivered to subscribers."""
        op = Opcode.SAVE_VHCA_STATE
        vf = self._lookup(vhca_id, op)
        if isinstance(vf, CmdResult):
            return self._finish(None, op, _as(SaveAccepted, vf))
        result = self._injected(vf, op, SaveAccepted) or self._save(
            vf, op_mod, incremental, set_track, va, mkey, size, token
        )
        return self._finish(vf, op, result)

    def _save(
        self,
        vf: Vf,
        op_mod: int,
        inc: bool,
        track: bool,
        va: int,
        mkey: int,
        size: int,
        token: int,
    ) -> SaveAccepted:
        def fail(status: CmdStatus, syn: Syndrome, msg: str) -> SaveAccepted:
            return _fail(SaveAccepted, status, syn, msg)

        if op_mod != 0:
            return fail(
                CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD, f"op_mod {op_mod} (must be 0)"
            )
        if vf.save_in_flight is not None:
            return fail(
                CmdStatus.RES_BUSY,
                Syndrome.SAVE_IN_FLIGHT,
                "a SAVE_VHCA_STATE is already in flight on this function",
            )
        if track and not vf.config.caps.migration_tracking_state:
            return fail(
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.CAP_MISSING,
                "set_track needs cmd_hca_cap_2.migration_tracking_state",
            )
        cleanup = not inc and not track and not vf.fully_suspended
        if va < 0 or va > (1 << 64) - 1:
            return fail(CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, f"va {va} out of range")
        if size < 0 or size > MAX_U32 or (size == 0 and not cleanup):
            return fail(
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.BAD_SIZE,
                f"size {size} must be between 1 and 2^32-1",
            )
        if size or not cleanup:
            dest = self._host_range(mkey, va, size)
            if isinstance(dest, CmdResult):
                return _as(SaveAccepted, dest)
        else:
            dest = memoryview(bytearray(0))
        if inc and not vf.tracking and vf.chunked is None:
            return fail(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.NO_TRACKING,
                "incremental SAVE without a tracking session",
            )
        if not track and not cleanup and not vf.fully_suspended:
            return fail(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.NOT_SUSPENDED,
                "a final (untracked) SAVE needs the function fully suspended",
            )
        if track and vf.fully_suspended:
            return fail(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.NOT_RUNNING,
                "tracking cannot start or continue on a suspended function",
            )

        token = token or next(self._tokens)
        completion_fault = vf.faults.take(FaultKind.FAIL, Opcode.SAVE_VHCA_STATE)
        lost = inc and track and vf.faults.take(FaultKind.TRACKING_LOST) is not None
        status: int = CmdStatus.OK
        syndrome: int = Syndrome.NONE
        diag = ""
        written = next_required = 0
        if completion_fault is not None:
            status, syndrome = completion_fault.status, completion_fault.syndrome
            diag = "injected fault"
        elif lost:
            vf.end_tracking()
            status, syndrome, diag = (
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.TRACKING_LOST,
                "tracking session lost",
            )
        else:
            try:
                written, next_required = self._write_image(vf, inc, track, cleanup, dest)
            except ImageError as e:
                return fail(CmdStatus.BAD_PARAM_ERR, e.syndrome, str(e))
        vf.saved_bytes += written
        vf.save_in_flight = token
        vf.advance(self.clock.now())  # reconfigurations waiting for saved bytes
        self._schedule_completion(
            vf, token, int(status), int(syndrome), written, next_required, diag
        )
        return SaveAccepted(token=token)

    def _write_image(
        self, vf: Vf, inc: bool, track: bool, cleanup: bool, dest: memoryview
    ) -> tuple[int, int]:
        """Write the image a SAVE asks for; (bytes written, next_required_umem_size).

        Nothing about the VF changes unless the image was written.
        """
        arena = vf.state.arena
        if cleanup:
            # Pre-copy cleanup (mlx5vf PRE_COPY -> RUNNING): the driver discards
            # the data; the firmware only drops the tracking session.
            vf.end_tracking()
            vf.chunked = None
            return 0, 0
        if track:
            if inc:
                plan, kind, chain, seq = (
                    vf.incremental_plan(),
                    ImageKind.INCREMENTAL,
                    vf.chain_id,
                    vf.next_seq,
                )
            else:
                plan, kind, chain, seq = vf.full_plan(), ImageKind.FULL, vf.next_chain_id(), 0
                # A new session: a final save left in pieces by an earlier,
                # abandoned migration is dropped, else the next final SAVE
                # would continue it (the old chain) inside the new one.
                vf.chunked = None
            # A tracked image is complete even if not everything fit: what is
            # left stays pending (dirty) for the next one.
            res = write_piece(
                dest,
                plan,
                Cursor(),
                arena,
                kind=kind,
                chain_id=chain,
                seq=seq,
                piece=0,
                whole=False,
                standalone=True,
                allow_empty=inc,
            )
            if inc:
                vf.next_seq += 1
                vf.captured(res.data_ranges, res.table_written)
            else:
                vf.begin_chain(chain)
                vf.start_tracking_after_full(res.data_ranges)
            return res.size, 0
        # Final (untracked) image of a fully suspended function, maybe in pieces.
        fresh = not (inc and vf.chunked is not None)
        if not fresh:
            assert vf.chunked is not None
            job = vf.chunked
        elif inc:
            job = ChunkedSave(
                vf.incremental_plan(), Cursor(), ImageKind.INCREMENTAL, vf.next_seq, 0, vf.chain_id
            )
        else:
            job = ChunkedSave(vf.full_plan(), Cursor(), ImageKind.FULL, 0, 0, vf.next_chain_id())
        res = write_piece(
            dest,
            job.plan,
            job.cursor,
            arena,
            kind=job.kind,
            chain_id=job.chain_id,
            seq=job.seq,
            piece=job.next_piece,
            whole=not vf.chunk_armed,
        )
        if fresh:
            if job.kind == ImageKind.FULL:
                vf.begin_chain(job.chain_id)
            vf.next_seq = job.seq + 1
            vf.end_tracking()
        if job.plan.finished(res.cursor):
            vf.chunked = None
            return res.size, 0
        job.cursor = res.cursor
        job.next_piece += 1
        vf.chunked = job
        return res.size, self._next_piece_size(vf, job.plan, job.cursor)

    @staticmethod
    def _next_piece_size(vf: Vf, plan: Plan, cur: Cursor) -> int:
        """The buffer the next piece needs: a chunk, less at the end, more if
        its first record (the object table) is larger."""
        chunk = vf.config.chunk_size
        return max(min(plan.pieces_size(chunk, cur), chunk), plan.min_piece(cur))

    def _schedule_completion(
        self,
        vf: Vf,
        token: int,
        status: int,
        syndrome: int,
        size: int,
        next_required: int,
        diag: str,
    ) -> None:
        cfg = vf.config
        issued = self.clock.now()
        duration = cfg.save_latency_s + (size / cfg.save_bandwidth if cfg.save_bandwidth else 0.0)
        drop = vf.faults.take(FaultKind.DROP_COMPLETION) is not None
        delayed = vf.faults.take(FaultKind.DELAY_COMPLETION)
        if delayed is not None:
            duration += delayed.delay_s
        vhca_id = vf.vhca_id

        def complete() -> None:
            live = self.vfs.get(vhca_id)
            if live is not vf or vf.save_in_flight != token:
                return  # aborted (FLR, removal): the abort already completed it
            vf.save_in_flight = None
            self.stats.save_seconds.observe(self.clock.now() - issued)
            if status == CmdStatus.OK:
                self.stats.image_bytes_saved += size
            if drop:
                return
            self._deliver(
                SaveCompletion(
                    token, vhca_id, status, syndrome, size, next_required, self.clock.now(), diag
                )
            )

        self.clock.call_at(self.clock.now() + duration, complete)

    def _abort_save(self, vf: Vf, why: str) -> None:
        token = vf.save_in_flight
        if token is None:
            return
        vf.save_in_flight = None
        self._deliver(
            SaveCompletion(
                token,
                vf.vhca_id,
                CmdStatus.INT_ERR,
                Syndrome.ABORTED,
                0,
                0,
                self.clock.now(),
                f"SAVE aborted: {why}",
            )
        )

    # --- LOAD_VHCA_STATE ------------------------------------------------------

    def load_vhca_state(
        self, vhca_id: int, *, op_mod: int = 0, va: int = 0, mkey: int = 0, size: int = 0
    ) -> CmdResult:
        op = Opcode.LOAD_VHCA_STATE
        vf = self._lookup(vhca_id, op)
        if isinstance(vf, CmdResult):
            return self._finish(None, op, vf)
        result = self._injected(vf, op, CmdResult) or self._load(vf, op_mod, va, mkey, size)
        return self._finish(vf, op, result)

    def _load(self, vf: Vf, op_mod: int, va: int, mkey: int, size: int) -> CmdResult:
        def fail(status: CmdStatus, syn: Syndrome, msg: str) -> CmdResult:
            return _fail(CmdResult, status, syn, msg)

        if op_mod != 0:
            return fail(
                CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD, f"op_mod {op_mod} (must be 0)"
            )
        if not 1 <= size <= MAX_U32:
            return fail(
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.BAD_SIZE,
                f"size {size} must be between 1 and 2^32-1",
            )
        src = self._host_range(mkey, va, size)
        if isinstance(src, CmdResult):
            return src
        if not vf.fully_suspended:
            return fail(
                CmdStatus.BAD_RES_STATE_ERR,
                Syndrome.NOT_SUSPENDED,
                "LOAD needs the function fully suspended",
            )
        if vf.save_in_flight is not None:
            return fail(CmdStatus.RES_BUSY, Syndrome.SAVE_IN_FLIGHT, "a SAVE is in flight")
        if vf.tracking or vf.chunked is not None:
            return fail(
                CmdStatus.BAD_RES_STATE_ERR, Syndrome.MIGRATION_BUSY, "the function is being saved"
            )
        if not vf.config.caps.migration_multi_load and vf.loads_since_suspend >= 1:
            return fail(
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.CAP_MISSING,
                "more than one LOAD needs cmd_hca_cap_2.migration_multi_load",
            )
        try:
            image = parse_image(src)
            if image.header.payload_len + HEADER_SIZE != size:
                raise ImageError(
                    Syndrome.IMAGE_TRAILING, f"LOAD size {size} is larger than the image"
                )
            starts = self._check_chain(vf, image.header)
            vf.state = apply_image(vf.state, image, starts_chain=starts)
        except ImageError as e:
            return fail(CmdStatus.BAD_PARAM_ERR, e.syndrome, str(e))
        h = image.header
        if h.last_piece:
            vf.load_chain = LoadChain(h.chain_id, h.seq, 0)
        else:
            vf.load_chain = LoadChain(h.chain_id, h.seq, h.piece + 1)
        vf.loads_since_suspend += 1
        vf.loaded_bytes += size
        self.stats.image_bytes_loaded += size
        return CmdResult()

    @staticmethod
    def _check_chain(vf: Vf, h: ImageHeader) -> bool:
        """Whether this image starts a new chain; raises if it is out of place."""
        chain = vf.load_chain
        if h.kind == ImageKind.FULL and h.seq == 0 and h.piece == 0:
            return True  # a full image may abandon an unfinished one
        if chain is None:
            raise ImageError(
                Syndrome.IMAGE_OUT_OF_ORDER, f"image {h.seq}.{h.piece} needs the images before it"
            )
        if h.chain_id != chain.chain_id:
            raise ImageError(
                Syndrome.IMAGE_FOREIGN,
                "image belongs to another migration (chain) than the one loaded",
            )
        want = (chain.seq, chain.next_piece) if chain.next_piece else (chain.seq + 1, 0)
        if (h.seq, h.piece) != want:
            raise ImageError(
                Syndrome.IMAGE_OUT_OF_ORDER,
                f"image {h.seq}.{h.piece} loaded where {want[0]}.{want[1]} is due",
            )
        return False

    # --- PAGE_TRACK general objects (DMA dirty tracking) ---------------------------

    def create_page_tracker(
        self, vhca_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackResult:
        vf = self._lookup(vhca_id, Opcode.CREATE_GENERAL_OBJECT)
        if isinstance(vf, CmdResult):
            return _as(PageTrackResult, vf)
        if not vf.config.caps.adv_virtualization:
            return _fail(
                PageTrackResult,
                CmdStatus.BAD_OP_ERR,
                Syndrome.CAP_MISSING,
                "page tracking needs cmd_hca_cap.adv_virtualization",
            )
        if vf.page_trackers:
            return _fail(
                PageTrackResult,
                CmdStatus.RES_BUSY,
                Syndrome.MIGRATION_BUSY,
                "the function already has a page tracker",
            )
        try:
            tracker = PageTracker.create(next(self._ids), ranges, log_page_size)
        except PageTrackError as e:
            return _fail(PageTrackResult, CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, str(e))
        vf.page_trackers[tracker.obj_id] = tracker
        return PageTrackResult(obj_id=tracker.obj_id)

    def report_page_tracker(
        self, vhca_id: int, obj_id: int, iova: int, length: int
    ) -> PageTrackResult:
        vf = self._lookup(vhca_id, Opcode.MODIFY_GENERAL_OBJECT)
        if isinstance(vf, CmdResult):
            return _as(PageTrackResult, vf)
        tracker = vf.page_trackers.get(obj_id)
        if tracker is None:
            return _fail(
                PageTrackResult,
                CmdStatus.BAD_RES_ERR,
                Syndrome.FIELD_RANGE,
                f"no page tracker {obj_id}",
            )
        return PageTrackResult(obj_id=obj_id, dirty=tracker.report(iova, length))

    def destroy_page_tracker(self, vhca_id: int, obj_id: int) -> CmdResult:
        vf = self._lookup(vhca_id, Opcode.DESTROY_GENERAL_OBJECT)
        if isinstance(vf, CmdResult):
            return vf
        if vf.page_trackers.pop(obj_id, None) is None:
            return _fail(
                CmdResult, CmdStatus.BAD_RES_ERR, Syndrome.FIELD_RANGE, f"no page tracker {obj_id}"
            )
        return CmdResult()

    # --- PCI function level reset ------------------------------------------------

    def function_level_reset(self, vhca_id: int) -> CmdResult:
        if vhca_id not in self.vfs:
            return _fail(
                CmdResult,
                CmdStatus.BAD_PARAM_ERR,
                Syndrome.UNKNOWN_VHCA,
                f"no function with vhca_id {vhca_id}",
            )
        vf = self.vfs[vhca_id]
        vf.advance(self.clock.now())
        self._abort_save(vf, "function level reset")
        vf.reset_function(self.clock.now())
        return CmdResult()


def _as(cls: type[R], r: CmdResult) -> R:
    """The same failure as a result of another command's type."""
    return cls(status=r.status, syndrome=r.syndrome, diagnostic=r.diagnostic, delay_s=r.delay_s)


def vf_info(vf: Vf) -> VfInfo:
    """A snapshot of one VF for scenario clients."""
    return VfInfo(
        vf_id=vf.vf_id,
        vhca_id=vf.vhca_id,
        function_id=vf.function_id,
        config=replace(vf.config, seed=vf.seed),  # the seed in effect
        initiator_suspended=vf.initiator_suspended,
        responder_suspended=vf.responder_suspended,
        tracking=vf.tracking,
        migration_state=int(vf.migration_state()),
        num_objects=len(vf.state.objects),
        saved_bytes=vf.saved_bytes,
        loaded_bytes=vf.loaded_bytes,
        reconfigurations=vf.reconfigurations,
        save_in_flight=vf.save_in_flight is not None,
        seed=vf.seed,
    )

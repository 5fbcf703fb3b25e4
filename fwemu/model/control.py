"""The scenario side: what a test or an operator does to the emulated VFs
(create, remove, configure, reconfigure, arm faults, read digests).  These are
no firmware commands: they fail with FirmwareError, not with a syndrome."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING

from ..link.ifc import Fault, FirmwareError, ReconfigMode, VfConfig, VfInfo
from .limits import MAX_PENDING_TRIGGERS, LimitReached
from .memory import OutOfMemory
from .save import abort_save
from .vf import ReconfigTrigger, Vf

if TYPE_CHECKING:
    from .state import FirmwareState


def create_vfs(fw: FirmwareState, count: int, config: VfConfig | None) -> list[Vf]:
    cfg = config or fw.defaults
    cfg.validate()
    if count < 1:
        raise FirmwareError("count must be at least 1")
    if len(fw.vfs) + count > fw.MAX_VFS:
        raise FirmwareError(f"at most {fw.MAX_VFS} VFs per firmware")
    # Checked whole before any VF exists, so that a refusal creates none.
    if fw.memory.used + count * cfg.size > fw.memory.limit:
        raise OutOfMemory(
            f"{count} VFs of {cfg.size} bytes do not fit the firmware's memory limit "
            f"({fw.memory.used} of {fw.memory.limit} bytes held)"
        )
    created: list[Vf] = []
    now = fw.clock.now()
    try:
        for _ in range(count):
            vf_id = next(i for i in itertools.count() if i + 1 not in fw.vfs)
            seed = cfg.seed if cfg.seed is not None else (fw.seed * 1_000_003 + vf_id) % (1 << 64)
            uid = f"{fw.instance:016x}-{next(fw.vf_serial)}"
            vf = Vf(vf_id, cfg, seed, uid=uid, now=now, memory=fw.memory)
            fw.vfs[vf.vhca_id] = vf
            created.append(vf)
    except OutOfMemory:
        # The allocation itself failed: the VFs made so far go too.
        for vf in created:
            del fw.vfs[vf.vhca_id]
            vf.free()
        raise
    return created


def remove_vf(fw: FirmwareState, vhca_id: int) -> None:
    vf = fw.vf(vhca_id)
    abort_save(fw, vf, "VF removed")
    del fw.vfs[vhca_id]
    fw.holders.pop(vhca_id, None)
    vf.free()
    fw.stats.reconfigurations_retired += vf.reconfigurations


def configure_vf(fw: FirmwareState, vhca_id: int, changes: dict[str, object]) -> Vf:
    vf = fw.vf(vhca_id)
    if "size" in changes and changes["size"] != vf.config.size:
        raise FirmwareError("a VF's size is fixed at creation; remove and create it again")
    cfg = vf.with_config(**changes)
    cfg.validate()
    now = fw.clock.now()
    vf.advance(now)
    vf.config = cfg
    vf.workload.set_rate(cfg.dirty_bytes_per_s, now)
    vf.auto.set_rate(cfg.reconfig_rate_per_s, now)
    return vf


def reset_vf(fw: FirmwareState, vhca_id: int) -> Vf:
    """The VF as created (Vf.reset); a SAVE in flight completes with
    INT_ERR / ABORTED, as on removal or FLR.  OutOfMemory changes nothing."""
    vf = fw.vf(vhca_id)
    vf.reset(fw.clock.now())
    abort_save(fw, vf, "VF reset")
    return vf


def reconfigure(
    fw: FirmwareState,
    vhca_id: int,
    objects: list[tuple[int, int]],
    at_time: float | None,
    after_saved_bytes: int | None,
    mode: int = ReconfigMode.ADD,
) -> int:
    """Schedule (or run now) a reconfiguration; returns its trigger id.
    One that runs now and does not fit (the VF's size limit, the firmware's
    memory) is refused with OutOfMemory, the VF unchanged; one that would wait
    beyond MAX_PENDING_TRIGGERS with LimitReached, nothing scheduled."""
    vf = fw.vf(vhca_id)
    for _, size in objects:
        if not 1 <= size <= VfConfig.MAX_SIZE:
            raise FirmwareError("object size out of range")
    if at_time is not None and after_saved_bytes is not None:
        raise FirmwareError("give a time or a byte count, not both")
    if mode not in set(ReconfigMode):
        raise FirmwareError(f"unknown reconfiguration mode {mode}")
    adds = sum(size for _, size in objects) or vf.config.reconfig_bytes
    # What REMOVE names goes, whatever its size; the others must fit the VF.
    if mode != ReconfigMode.REMOVE and adds > vf.size_limit:
        raise OutOfMemory(f"{adds} bytes of objects exceed the VF's size limit {vf.size_limit}")
    trig = ReconfigTrigger(0, list(objects), at_time, after_saved_bytes, mode)
    now = fw.clock.now()
    vf.advance(now)  # time passing, not the request: due triggers leave the queue first
    runs_now = vf.running and trig.due(now, vf.saved_bytes)
    if not runs_now and len(vf.triggers) >= MAX_PENDING_TRIGGERS:
        raise LimitReached(f"a VF holds at most {MAX_PENDING_TRIGGERS} pending reconfigurations")
    if runs_now:
        vf.reconfigure_now(trig.objects, mode)
    trig.trigger_id = next(fw.ids)  # taken only once accepted
    if not runs_now:
        vf.triggers.append(trig)  # a due one waits for the VF to run again
    return trig.trigger_id


def reconfig_runs_now(
    fw: FirmwareState, vhca_id: int, at_time: float | None, after_saved_bytes: int | None
) -> bool:
    """Whether a reconfiguration asked for now would run at once (not wait)."""
    vf = fw.vf(vhca_id)
    now = fw.clock.now()
    vf.advance(now)
    return vf.running and ReconfigTrigger(0, [], at_time, after_saved_bytes).due(
        now, vf.saved_bytes
    )


def cancel_reconfigure(fw: FirmwareState, vhca_id: int, trigger_id: int) -> bool:
    """Drop a pending reconfiguration: whether it was still pending."""
    vf = fw.vf(vhca_id)
    for trig in vf.triggers:
        if trig.trigger_id == trigger_id:
            vf.triggers.remove(trig)
            return True
    return False


def disarm_fault(fw: FirmwareState, vhca_id: int, fault_id: int) -> bool:
    """Drop an armed fault: whether it was still armed."""
    return fw.vf(vhca_id).faults.remove(fault_id)


def inject_fault(fw: FirmwareState, vhca_id: int, fault: Fault) -> int:
    vf = fw.vf(vhca_id)
    try:
        vf.faults.add(fault, fw.ids)
    except ValueError as e:
        raise FirmwareError(str(e)) from None
    fw.stats.faults_injected[fault.kind.name.lower()] += 1
    return fault.fault_id


def set_vf_holders(fw: FirmwareState, vhca_id: int, principals: frozenset[str]) -> None:
    fw.vf(vhca_id)  # NoSuchVf for an unknown one
    if principals:
        fw.holders[vhca_id] = principals
    else:
        fw.holders.pop(vhca_id, None)


def touch(fw: FirmwareState, vhca_id: int) -> Vf:
    """The VF brought up to the current time (for inspection)."""
    vf = fw.vf(vhca_id)
    vf.advance(fw.clock.now())
    return vf


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
        uid=vf.uid,
        state_size=vf.state.size,
    )

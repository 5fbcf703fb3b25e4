"""The mlx5vf variant driver's device (drivers/vfio/pci/mlx5/main.c): probe,
open/close, reset, the migration FSM arcs (the VFIO core's arc loop over
mlx5vf_pci_step_device_state_locked, whose table is driver/mlx5/arcs.py),
MIG_DATA_SIZE."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fwemu.link.base import FirmwareLink
from fwemu.link.ifc import PAGE_SIZE, ResumeOpMod, SaveCompletion, SuspendOpMod

from ..audit import AuditLog
from ..events import EventBus, PrecopyAnswered, SaveCompleted, SaveFailed, StateChanged
from ..priority import SwitchoverPriority
from ..vfio.errors import VfioError
from ..vfio.migration import vfio_mig_step_loop
from ..vfio.ops import MigrationFile, VfioLogOps, VfioMigrationOps
from ..vfio.precopy import VfioPrecopyInfo
from ..vfio.uapi import (
    VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY,
    VFIO_MIGRATION_STOP_COPY,
    MigState,
)
from .arcs import MLX5VF_ARCS, ArcStep
from .cmd import (
    MAX_CHUNK_SIZE,
    MLX5VF_QUERY_CLEANUP,
    MLX5VF_QUERY_FINAL,
    MLX5VF_QUERY_INC,
    BufferBudget,
    Commands,
    DataBuffer,
    MigfState,
    MigrationCaps,
)
from .latency import LatencyHistogram
from .migf import Mlx5VfMigrationFile
from .resume import ResumeFile
from .save import SaveFile
from .tracker import VhcaPageTracker

if TYPE_CHECKING:
    from ..vfio.device import VfioDevice

S = MigState

log = logging.getLogger("vfio-driver.mlx5")


@dataclass
class DeviceStats:
    """What the driver counts (metrics and events read these)."""

    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes_read: int = 0
    bytes_written: int = 0
    images_saved: int = 0
    image_bytes_saved: int = 0
    images_loaded: int = 0
    image_bytes_loaded: int = 0
    save_failures: int = 0
    precopy_info: int = 0
    precopy_info_v1: int = 0  # answers without the MIG_PRECOPY_INFOv2 opt-in
    precopy_info_v2: int = 0  # answers after it (REINITs included)
    reinits: int = 0
    read_enomsg: int = 0  # reads answered ENOMSG
    # From the QUERY that first reported migration_state INIT to the
    # PRECOPY_INFO answer carrying REINIT.
    reinit_detection: LatencyHistogram = field(default_factory=LatencyHistogram)


class Mlx5VfDevice:
    """One mlx5 VF bound to the mlx5vf driver: VfioDeviceDriver, VfioMigrationOps."""

    def __init__(
        self,
        link: FirmwareLink,
        function_id: int,
        *,
        cmd_timeout: float = 60.0,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        events: EventBus | None = None,
        audit: AuditLog | None = None,
        budget: BufferBudget | None = None,
        priority: SwitchoverPriority | None = None,
    ) -> None:
        self.link = link
        self.function_id = function_id
        self.cmd_timeout = cmd_timeout
        self.max_chunk_size = max_chunk_size
        self.caps = MigrationCaps()
        self.migration_flags = 0
        self.mig_ops: VfioMigrationOps | None = None
        self.log_ops: VfioLogOps | None = None
        self.cmds = Commands(self)
        self.state_mutex = asyncio.Lock()
        self.mig_state = S.RUNNING
        self.saving_migf: SaveFile | None = None
        self.resuming_migf: ResumeFile | None = None
        self.mdev_detach = False
        self.core: VfioDevice  # set when the VFIO core registers the device
        self.stats = DeviceStats()
        self.events = events if events is not None else EventBus()
        self.audit = audit if audit is not None else AuditLog(self.events)
        self.streams = 0  # migration files made so far: each one's number
        self.tracker = VhcaPageTracker(self)
        self.budget = budget if budget is not None else BufferBudget()  # per client, shared
        self.priority = priority  # shared by the driver's devices (driver/priority.py)
        # The device's files when the arc in progress started (ArcHooks).
        self._arc_files: tuple[Mlx5VfMigrationFile, ...] = ()

    async def probe(self) -> None:
        """mlx5vf_cmd_set_migratable(): migration is offered only when the
        firmware has every capability mlx5vf requires."""
        self.caps = await self.cmds.query_migration_caps(self.function_id)
        if self.caps.migrate_cap:
            self.migration_flags = (
                VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY
            )
            self.mig_ops = self
            if self.caps.log_cap:
                self.log_ops = self.tracker

    @property
    def migratable(self) -> bool:
        return self.caps.migrate_cap

    @property
    def name(self) -> str:
        return self.core.name

    # --- vfio_device_ops ---------------------------------------------------------------

    async def open_device(self) -> None:
        """vfio_pci_core_enable() resets the function; mlx5vf starts at RUNNING."""
        if self.caps.migrate_cap:
            await self.cmds.function_level_reset()
            self.mig_state = S.RUNNING

    async def close_device(self) -> None:
        """mlx5vf_cmd_close_migratable(), then vfio_pci_core_disable()'s reset."""
        if self.caps.migrate_cap:
            async with self.state_mutex:
                files = self._files()
                await self.disable_fds()
                self._streams_ended(files, "close_device")
                await self.tracker.free()
            self._switchover_ended()
            await self.cmds.function_level_reset()

    async def reset(self) -> None:
        """VFIO_DEVICE_RESET: the function is reset (FLR), then reset_done puts
        the FSM back to RUNNING and ends the data files.  The kernel's
        reset_done cannot take state_mutex (lock order against mm locks) and
        defers the work to its holder (deferred_reset); with no such lock
        order here, reset_done takes the mutex and does it itself."""
        if not self.caps.migrate_cap:
            return
        files = self._files()
        self.audit.device_reset(
            self.name, (m.stream_id for m in files), sum(m.io_in_progress for m in files)
        )
        await self.cmds.function_level_reset()
        async with self.state_mutex:
            files = self._files()
            if self.mig_state != S.RUNNING and self.events.subscribers:
                self._publish(StateChanged(self.mig_state.name, S.RUNNING.name, reset=True), None)
            self.mig_state = S.RUNNING
            self._switchover_ended()
            await self.disable_fds()
            self._streams_ended(files, "VFIO_DEVICE_RESET")

    async def device_feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        raise VfioError(errno.ENOTTY, f"feature {flags & 0xFFFF} not supported")

    # --- vfio_migration_ops -------------------------------------------------------------

    async def migration_get_state(self) -> MigState:
        async with self.state_mutex:
            return self.mig_state

    async def migration_get_data_size(self) -> int:
        """mlx5vf_pci_get_data_size(): a full query, in any state."""
        await self.precopy_turn()
        async with self.state_mutex:
            _, total, _ = await self.cmds.query_vhca_migration_state(0)
            return total

    async def migration_set_state(self, new_state: MigState) -> MigrationFile | None:
        """mlx5vf_pci_set_device_state(): the VFIO core's arc loop over
        step_device_state_locked; a failed arc leaves the device at the last
        state reached."""
        async with self.state_mutex:
            self.audit.state_change_requested(self.name, self.mig_state.name, new_state.name)
            _, file = await vfio_mig_step_loop(
                self.mig_state, new_state, self.migration_flags, self.step_device_state_locked, self
            )
            return file

    # ArcHooks: what mlx5vf does around each arc.

    def arc_starting(self, cur: MigState, nxt: MigState) -> None:
        if nxt == S.STOP_COPY and cur in (S.PRE_COPY, S.PRE_COPY_P2P):
            self._leaving_precopy(f"{cur.name} -> {nxt.name}")
        self._arc_files = self._files()

    def arc_ended(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        self._streams_ended(self._arc_files, f"{cur.name} -> {nxt.name}")

    def arc_done(self, cur: MigState, nxt: MigState, file: MigrationFile | None) -> None:
        files, self._arc_files = self._arc_files, ()
        migf = file if isinstance(file, Mlx5VfMigrationFile) else None
        self._transitioned(cur, nxt, migf or (files[0] if files else None))
        self.mig_state = nxt
        if nxt in (S.PRE_COPY_P2P, S.STOP_COPY):
            if self.priority is not None:
                self.priority.stopped(self._principal(), self)
        else:
            self._switchover_ended()

    # Switchover priority (driver/priority.py); not the kernel's.

    def _principal(self) -> str:
        core = getattr(self, "core", None)
        return (core.group.opened_by or "") if core is not None else ""

    def _switchover_ended(self) -> None:
        if self.priority is not None:
            self.priority.resumed(self)

    async def precopy_turn(self) -> None:
        """A request that only moves this device's precopy along (PRE_COPY)
        waits while its principal's other devices switch over, at most the
        priority's max_wait."""
        if self.priority is not None and self.mig_state == S.PRE_COPY:
            await self.priority.precopy_turn(self._principal())

    async def step_device_state_locked(self, new: MigState) -> SaveFile | ResumeFile | None:
        """mlx5vf_pci_step_device_state_locked(): the steps of one arc (MLX5VF_ARCS)."""
        cur = self.mig_state
        steps = MLX5VF_ARCS.get((cur, new))
        if steps is None:
            # vfio_mig_get_next_state() hands out no other arc.
            raise VfioError(errno.EINVAL, f"arc {cur.name} -> {new.name} (WARN)")
        file: SaveFile | ResumeFile | None = None
        for step in steps:
            file = await self._arc_step(step)
        return file

    async def _arc_step(self, step: ArcStep) -> SaveFile | ResumeFile | None:
        cmds = self.cmds
        match step:
            case ArcStep.SUSPEND_RESPONDER:
                await cmds.suspend_vhca(SuspendOpMod.SUSPEND_RESPONDER)
            case ArcStep.RESUME_RESPONDER:
                await cmds.resume_vhca(ResumeOpMod.RESUME_RESPONDER)
            case ArcStep.SUSPEND_INITIATOR:
                await cmds.suspend_vhca(SuspendOpMod.SUSPEND_INITIATOR)
            case ArcStep.RESUME_INITIATOR:
                await cmds.resume_vhca(ResumeOpMod.RESUME_INITIATOR)
            case ArcStep.SAVE_DEVICE_DATA:
                return await self.save_device_data(track=False)
            case ArcStep.SAVE_DEVICE_DATA_TRACK:
                return await self.save_device_data(track=True)
            case ArcStep.SAVE_DEVICE_INC_DATA:
                await self.save_device_inc_data()
            case ArcStep.PRE_COPY_CLEANUP:
                await self._pre_copy_cleanup()
            case ArcStep.RESUME_DEVICE_DATA:
                return self.resume_device_data()
            case ArcStep.DISABLE_FDS:
                await self.disable_fds()
        return None

    async def _pre_copy_cleanup(self) -> None:
        """PRE_COPY -> RUNNING: tell the firmware to drop tracking with a
        non-incremental, untracked SAVE whose data is discarded, then end the
        file; the arc fails with EIO if the file ended in error."""
        migf = self.saving_migf
        if migf is None:
            # A failed cleanup already ended the file (the kernel would
            # dereference NULL here): only a reset gets out of this.
            raise VfioError(errno.ENODEV, "no saving file left: reset the device")
        size, _, _ = await self.cmds.query_vhca_migration_state(
            MLX5VF_QUERY_INC | MLX5VF_QUERY_CLEANUP
        )
        buf = await migf.get_data_buffer(size)
        try:
            await self.cmds.save_vhca_state(migf, buf, False, False)
        except VfioError:
            migf.put_data_buffer(buf)
            raise
        last_state = await self.disable_fds()
        if last_state == MigfState.ERROR:
            raise VfioError(errno.EIO, "the saving file ended in error")

    def resume_device_data(self) -> ResumeFile:
        """mlx5vf_pci_resume_device_data(): a new resuming file (its buffers
        come with the first record)."""
        migf = self.resuming_migf = ResumeFile(self)
        return migf

    async def save_device_data(self, *, track: bool) -> SaveFile:
        """mlx5vf_pci_save_device_data(): a new saving file and its first SAVE."""
        migf = SaveFile(self)
        self.saving_migf = migf  # SUSPEND and queries see it from now on
        try:
            length, full_size, _ = await self.cmds.query_vhca_migration_state(0)
            await migf.prep_stop_copy(length, full_size, track)
            first = migf.buf[0]
            assert first is not None
            if track:
                # buf[0] stays ready for the stop-copy phase.
                buf = await migf.alloc_data_buffer(first.npages * PAGE_SIZE)
            else:
                buf, migf.buf[0] = first, None
            try:
                await self.cmds.save_vhca_state(migf, buf, False, track)
            except VfioError:
                await migf.free_data_buffer(buf)
                raise
        except VfioError:
            self.saving_migf = None
            await migf.clean_resources()
            raise
        return migf

    async def save_device_inc_data(self) -> None:
        """mlx5vf_pci_save_device_inc_data(): the final image into buf[0]."""
        migf = self.saving_migf
        if migf is None or migf.state == MigfState.ERROR:
            raise VfioError(errno.ENODEV, "the saving file is in error")
        buf = None
        try:
            length, _, _ = await self.cmds.query_vhca_migration_state(
                MLX5VF_QUERY_INC | MLX5VF_QUERY_FINAL
            )
            buf = await migf.stop_copy_buf(0, length)
            await self.cmds.save_vhca_state(migf, buf, True, False)
        except VfioError:
            if buf is not None:
                migf.put_data_buffer(buf)
            migf.mark_err()
            raise

    async def disable_fds(self) -> MigfState | None:
        """mlx5vf_disable_fds(): end both files (waiting for a SAVE in flight),
        free their buffers; returns the saving file's last state."""
        last_state = None
        if self.resuming_migf is not None:
            resuming, self.resuming_migf = self.resuming_migf, None
            await resuming.disable_fd()
        if self.saving_migf is not None:
            saving, self.saving_migf = self.saving_migf, None
            await saving.save_comp.acquire()  # outstanding callbacks finish first
            saving.save_comp.release()
            last_state = saving.state
            await saving.disable_fd()
        return last_state

    # --- observations (metrics, events, audit) --------------------------------------

    def new_stream_id(self) -> int:
        self.streams += 1
        return self.streams

    def _files(self) -> tuple[Mlx5VfMigrationFile, ...]:
        return tuple(m for m in (self.saving_migf, self.resuming_migf) if m is not None)

    def _streams_ended(self, files: tuple[Mlx5VfMigrationFile, ...], how: str) -> None:
        """Files of `files` that are no longer the device's ended with `how`."""
        for m in files:
            if m is not self.saving_migf and m is not self.resuming_migf:
                self.audit.stream_ended(self.name, m.stream_id, how)

    def _publish(
        self,
        payload: StateChanged | PrecopyAnswered | SaveCompleted | SaveFailed,
        migf: Mlx5VfMigrationFile | None,
        *,
        owner_is_client: bool = False,
    ) -> None:
        """An event about the device (and its file `migf`): the data fd is
        the file's, if a client holds it; the client (and its principal) is
        the caller's, or with `owner_is_client` (completions: no caller of
        their own) the holder's."""
        if migf is None:
            self.events.publish(self.name, payload)
            return
        owner = self.audit.owner(self.name, migf.stream_id)
        principal, client, fd = owner if owner is not None else (None, None, -1)
        self.events.publish(
            self.name,
            payload,
            client=client if owner_is_client else None,
            principal=principal if owner_is_client else None,
            data_fd=fd,
            stream=migf.stream_id,
        )

    def _transitioned(self, cur: MigState, nxt: MigState, migf: Mlx5VfMigrationFile | None) -> None:
        """An arc done; `migf`: the file it opened, continued or ended."""
        self.stats.transitions[(cur.name, nxt.name)] += 1
        if self.events.subscribers:
            self._publish(StateChanged(cur.name, nxt.name), migf)
        log.info(
            "state %s -> %s",
            cur.name,
            nxt.name,
            extra={
                "device": self.name,
                "from_state": cur.name,
                "to_state": nxt.name,
                "stream": migf.stream_id if migf is not None else None,
            },
        )

    def _leaving_precopy(self, arc: str) -> None:
        migf = self.saving_migf
        if migf is not None:
            self.audit.leaving_precopy(
                self.name,
                migf.stream_id,
                arc=arc,
                f_pos=migf.f_pos,
                initial_end=migf.pre_copy_initial_bytes_start + migf.pre_copy_initial_bytes,
                max_pos=migf.max_pos,
            )

    def bytes_read(self, n: int) -> None:
        self.stats.bytes_read += n

    def read_enomsg(self) -> None:
        self.stats.read_enomsg += 1

    def read_after_eof(self, migf: SaveFile) -> None:
        self.audit.read_after_eof(self.name, migf.stream_id)

    def bytes_written(self, n: int) -> None:
        self.stats.bytes_written += n

    def save_completed(self, migf: SaveFile, c: SaveCompletion, buf: DataBuffer) -> None:
        self.stats.images_saved += 1
        self.stats.image_bytes_saved += c.actual_image_size
        if self.events.subscribers:
            self._publish(SaveCompleted(c.actual_image_size), migf, owner_is_client=True)

    def save_failed(self, migf: SaveFile, c: SaveCompletion, status: int) -> None:
        self.stats.save_failures += 1
        if self.events.subscribers:
            self._publish(SaveFailed(status), migf, owner_is_client=True)

    def image_loaded(self, n: int) -> None:
        self.stats.images_loaded += 1
        self.stats.image_bytes_loaded += n

    def precopy_answered(
        self, migf: SaveFile, info: VfioPrecopyInfo, reinit: bool, *, fw_init_end: int
    ) -> None:
        """`fw_init_end`: where the new initial data the firmware reported
        (OPER_MIGRATION_INIT: a REINIT after the v2 opt-in) ends at most in
        the stream, 0 if it reported none."""
        v2 = self.core.precopy_info_v2
        stats = self.stats
        stats.precopy_info += 1
        if v2:
            stats.precopy_info_v2 += 1
        else:
            stats.precopy_info_v1 += 1
        stats.reinits += int(reinit)
        init_at, migf.init_reported_at = migf.init_reported_at, None
        if reinit and init_at is not None:
            stats.reinit_detection.observe(time.monotonic() - init_at)
        if reinit or fw_init_end or (info.flags and not v2):
            self.audit.precopy_answered(
                self.name,
                migf.stream_id,
                v2=v2,
                flags=info.flags,
                reinit=reinit,
                initial_bytes=info.initial_bytes,
                fw_init_end=fw_init_end,
            )
        if self.events.subscribers:
            self._publish(
                PrecopyAnswered(
                    info.initial_bytes, info.dirty_bytes, info.flags, 2 if v2 else 1, reinit
                ),
                migf,
            )

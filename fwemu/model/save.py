"""SAVE_VHCA_STATE: the checks, the image written into host memory, the
completion scheduled on the firmware clock, and its abort (FLR, removal)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..link.ifc import (
    MAX_U32,
    CmdResult,
    CmdStatus,
    FaultKind,
    Opcode,
    SaveAccepted,
    SaveCompletion,
    SaveVhcaStateIn,
    Syndrome,
)
from .image import Cursor, ImageError, ImageKind, write_piece
from .vf import ChunkedSave

if TYPE_CHECKING:
    from .state import FirmwareState
    from .vf import Vf


def save_vhca_state(fw: FirmwareState, vf: Vf, cmd: SaveVhcaStateIn) -> SaveAccepted:
    """Accept a SAVE (status 0) or refuse it.  An accepted SAVE writes its
    image into host memory now and completes after latency + size/bandwidth
    with a SaveCompletion delivered to subscribers."""
    inc, track, va, size = cmd.incremental, cmd.set_track, cmd.va, cmd.size
    if cmd.op_mod != 0:
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD, f"op_mod {cmd.op_mod} (must be 0)"
        )
    if vf.save_in_flight is not None:
        return cmd.result(
            CmdStatus.RES_BUSY,
            Syndrome.SAVE_IN_FLIGHT,
            "a SAVE_VHCA_STATE is already in flight on this function",
        )
    if track and not vf.config.caps.migration_tracking_state:
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.CAP_MISSING,
            "set_track needs cmd_hca_cap_2.migration_tracking_state",
        )
    cleanup = not inc and not track and not vf.fully_suspended
    if va < 0 or va > (1 << 64) - 1:
        return cmd.result(CmdStatus.BAD_PARAM_ERR, Syndrome.FIELD_RANGE, f"va {va} out of range")
    if size < 0 or size > MAX_U32 or (size == 0 and not cleanup):
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.BAD_SIZE,
            f"size {size} must be between 1 and 2^32-1",
        )
    if size or not cleanup:
        dest = fw.mkeys.host_range(cmd.mkey, va, size, cmd.principal)
        if isinstance(dest, CmdResult):
            return cmd.result(dest.status, dest.syndrome, dest.diagnostic)
    else:
        dest = memoryview(bytearray(0))
    if inc and not vf.tracking and vf.chunked is None:
        return cmd.result(
            CmdStatus.BAD_RES_STATE_ERR,
            Syndrome.NO_TRACKING,
            "incremental SAVE without a tracking session",
        )
    if not track and not cleanup and not vf.fully_suspended:
        return cmd.result(
            CmdStatus.BAD_RES_STATE_ERR,
            Syndrome.NOT_SUSPENDED,
            "a final (untracked) SAVE needs the function fully suspended",
        )
    if track and vf.fully_suspended:
        return cmd.result(
            CmdStatus.BAD_RES_STATE_ERR,
            Syndrome.NOT_RUNNING,
            "tracking cannot start or continue on a suspended function",
        )

    token = cmd.token or next(fw.tokens)
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
            written, next_required = _write_image(vf, inc, track, cleanup, dest)
        except ImageError as e:
            return cmd.result(CmdStatus.BAD_PARAM_ERR, e.syndrome, str(e))
    vf.saved_bytes += written
    vf.save_in_flight = token
    vf.advance(fw.clock.now())  # reconfigurations waiting for saved bytes
    _schedule_completion(fw, vf, token, int(status), int(syndrome), written, next_required, diag)
    return SaveAccepted(token=token)


def _write_image(
    vf: Vf, inc: bool, track: bool, cleanup: bool, dest: memoryview
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
    return res.size, vf.next_piece_size(job.plan, job.cursor)


def _schedule_completion(
    fw: FirmwareState,
    vf: Vf,
    token: int,
    status: int,
    syndrome: int,
    size: int,
    next_required: int,
    diag: str,
) -> None:
    cfg = vf.config
    clock = fw.clock
    issued = clock.now()
    duration = cfg.save_latency_s + (size / cfg.save_bandwidth if cfg.save_bandwidth else 0.0)
    drop = vf.faults.take(FaultKind.DROP_COMPLETION) is not None
    delayed = vf.faults.take(FaultKind.DELAY_COMPLETION)
    if delayed is not None:
        duration += delayed.delay_s
    vhca_id = vf.vhca_id

    def complete() -> None:
        live = fw.vfs.get(vhca_id)
        if live is not vf or vf.save_in_flight != token:
            return  # aborted (FLR, removal): the abort already completed it
        vf.save_in_flight = None
        fw.stats.save_seconds.observe(clock.now() - issued)
        if status == CmdStatus.OK:
            fw.stats.image_bytes_saved += size
        if drop:
            return
        fw.events.deliver(
            SaveCompletion(token, vhca_id, status, syndrome, size, next_required, clock.now(), diag)
        )

    clock.call_at(clock.now() + duration, complete)


def abort_save(fw: FirmwareState, vf: Vf, why: str) -> None:
    """Complete the SAVE in flight on `vf`, if any, with INT_ERR/ABORTED."""
    token = vf.save_in_flight
    if token is None:
        return
    vf.save_in_flight = None
    fw.events.deliver(
        SaveCompletion(
            token,
            vf.vhca_id,
            CmdStatus.INT_ERR,
            Syndrome.ABORTED,
            0,
            0,
            fw.clock.now(),
            f"SAVE aborted: {why}",
        )
    )

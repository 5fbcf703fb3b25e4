"""QUERY_HCA_CAP and QUERY_VHCA_MIGRATION_STATE."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from ..link.ifc import (
    MAX_U16,
    MAX_U32,
    CapType,
    CmdStatus,
    HcaCapResult,
    QueryHcaCapIn,
    QueryResult,
    QueryVhcaMigrationStateIn,
    Syndrome,
    VfCaps,
)
from .image import Cursor

if TYPE_CHECKING:
    from .state import FirmwareState
    from .vf import Vf


def query_hca_cap(fw: FirmwareState, cmd: QueryHcaCapIn) -> HcaCapResult:
    cap_type = cmd.op_mod >> 1
    if cmd.op_mod > MAX_U16 or cap_type not in (CapType.GENERAL_DEVICE, CapType.GENERAL_DEVICE_2):
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.BAD_OP_MOD,
            f"op_mod {cmd.op_mod:#x} names no capability this firmware has",
        )
    if not cmd.other_function:
        # The PF itself: vhca_id 0, and it supports everything but being migrated.
        return HcaCapResult(cap_type=cap_type, vhca_id=0, **asdict(VfCaps(migratable=False)))
    vf = next((v for v in fw.vfs.values() if v.function_id == cmd.function_id), None)
    if vf is None:
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.UNKNOWN_VHCA,
            f"no VF with function_id {cmd.function_id}",
        )
    # The capability bits are VfCaps' fields, by name.
    return HcaCapResult(cap_type=cap_type, vhca_id=vf.vhca_id, **asdict(vf.config.caps))


def query_vhca_migration_state(
    fw: FirmwareState, vf: Vf, cmd: QueryVhcaMigrationStateIn
) -> QueryResult:
    if cmd.op_mod != 0:
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD, f"op_mod {cmd.op_mod} (must be 0)"
        )
    if cmd.chunk and not vf.config.caps.migration_in_chunks:
        return cmd.result(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.CHUNKS_UNSUPPORTED,
            "chunk mode needs cmd_hca_cap_2.migration_in_chunks",
        )
    mig_state = vf.migration_state() if vf.config.caps.migration_state else 0
    if cmd.chunk:
        vf.chunk_armed = True
        if vf.chunked is not None and cmd.incremental:
            # What is left of the image being saved (continuations are incremental).
            plan, cur = vf.chunked.plan, vf.chunked.cursor
        else:
            plan, cur = vf.plan_for(cmd.incremental), Cursor()
        if plan.finished(cur):
            return QueryResult(migration_state=mig_state)
        return QueryResult(
            migration_state=mig_state,
            required_umem_size=vf.next_piece_size(plan, cur),
            remaining_total_size=plan.pieces_size(vf.config.chunk_size, cur),
        )
    plan = vf.plan_for(cmd.incremental)
    # Nothing changed since the last tracked SAVE: nothing to save (mlx5vf
    # issues a SAVE whenever this is above 0).
    size = 0 if plan.empty else plan.image_size()
    if size > MAX_U32:
        return cmd.result(
            CmdStatus.LIM_ERR, Syndrome.IMAGE_TOO_LARGE, f"a {size}-byte image needs chunk mode"
        )
    return QueryResult(migration_state=mig_state, required_umem_size=size)

"""LOAD_VHCA_STATE: the checks, the image applied to the function, and the
chain rules (which image may follow which)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..link.ifc import MAX_U32, CmdResult, CmdStatus, LoadVhcaStateIn, Syndrome
from .image import IMAGE_HEADER_SIZE, ImageError, ImageHeader, ImageKind, apply_image, parse_image
from .vf import LoadChain

if TYPE_CHECKING:
    from .state import FirmwareState
    from .vf import Vf


def load_vhca_state(fw: FirmwareState, vf: Vf, cmd: LoadVhcaStateIn) -> CmdResult:
    size = cmd.size
    if cmd.op_mod != 0:
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD, f"op_mod {cmd.op_mod} (must be 0)"
        )
    if not 1 <= size <= MAX_U32:
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_SIZE, f"size {size} must be between 1 and 2^32-1"
        )
    src = fw.mkeys.host_range(cmd.mkey, cmd.va, size, cmd.principal)
    if isinstance(src, CmdResult):
        return src
    if not vf.fully_suspended:
        return CmdResult(
            CmdStatus.BAD_RES_STATE_ERR,
            Syndrome.NOT_SUSPENDED,
            "LOAD needs the function fully suspended",
        )
    if vf.save_in_flight is not None:
        return CmdResult(CmdStatus.RES_BUSY, Syndrome.SAVE_IN_FLIGHT, "a SAVE is in flight")
    if vf.tracking or vf.chunked is not None:
        return CmdResult(
            CmdStatus.BAD_RES_STATE_ERR, Syndrome.MIGRATION_BUSY, "the function is being saved"
        )
    if not vf.config.caps.migration_multi_load and vf.loads_since_suspend >= 1:
        return CmdResult(
            CmdStatus.BAD_PARAM_ERR,
            Syndrome.CAP_MISSING,
            "more than one LOAD needs cmd_hca_cap_2.migration_multi_load",
        )
    try:
        image = parse_image(src)
        if image.header.payload_len + IMAGE_HEADER_SIZE != size:
            raise ImageError(Syndrome.IMAGE_TRAILING, f"LOAD size {size} is larger than the image")
        starts = _check_chain(vf, image.header)
        vf.state_changing()
        vf.state = apply_image(vf.state, image, starts_chain=starts, size_limit=vf.size_limit)
    except ImageError as e:
        return CmdResult(e.status, e.syndrome, str(e))
    h = image.header
    if h.last_piece:
        vf.load_chain = LoadChain(h.chain_id, h.seq, 0)
    else:
        vf.load_chain = LoadChain(h.chain_id, h.seq, h.piece + 1)
    vf.loads_since_suspend += 1
    vf.loaded_bytes += size
    fw.stats.image_bytes_loaded += size
    return CmdResult()


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

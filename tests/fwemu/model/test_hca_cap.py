"""QUERY_HCA_CAP: op_mod encoding, other-function lookup, per-VF capabilities."""

from __future__ import annotations

import pytest

from fwemu.link.ifc import (
    HCA_CAP_OPMOD_GET_CUR,
    HCA_CAP_OPMOD_GET_MAX,
    CapType,
    CmdStatus,
    KiB,
    Syndrome,
    VfCaps,
)

GENERAL_DEVICE_CUR = (CapType.GENERAL_DEVICE << 1) | HCA_CAP_OPMOD_GET_CUR
GENERAL_DEVICE_2_CUR = (CapType.GENERAL_DEVICE_2 << 1) | HCA_CAP_OPMOD_GET_CUR


def test_op_mod_encoding_is_cap_type_shifted_left_with_the_cur_bit():
    """mlx5_ifc.h: QUERY_HCA_CAP op_mod = (capability type << 1) | cur."""
    assert GENERAL_DEVICE_CUR == 0x1
    assert GENERAL_DEVICE_2_CUR == 0x41


async def test_general_device_caps_of_a_vf_name_its_vhca_id(h):
    """The VF is queried as "other function" by function_id = vf index + 1 and
    answers its vhca_id (= function_id) and cmd_hca_cap.migration (§5.1)."""
    vhcas = await h.vfs(3, size=64 * KiB)
    assert vhcas == [1, 2, 3]
    for function_id in vhcas:
        r = await h.link.query_hca_cap(
            op_mod=GENERAL_DEVICE_CUR, other_function=True, function_id=function_id
        )
        assert r.status == CmdStatus.OK, r
        assert r.vhca_id == function_id
        assert r.migration is True
        assert r.adv_virtualization is True
        assert r.cap_type == CapType.GENERAL_DEVICE


async def test_general_device_2_caps_report_every_migration_bit(h):
    """cmd_hca_cap_2 carries migratable, migration_multi_load,
    migration_tracking_state, migration_in_chunks and migration_state."""
    vhca = await h.vf(size=64 * KiB)
    r = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_2_CUR, function_id=vhca)
    assert r.status == CmdStatus.OK, r
    assert r.cap_type == CapType.GENERAL_DEVICE_2
    assert (
        r.migratable,
        r.migration_multi_load,
        r.migration_tracking_state,
        r.migration_in_chunks,
        r.migration_state,
    ) == (True, True, True, True, True)


async def test_get_max_op_mod_is_accepted_too(h):
    """op_mod bit 0 chooses current (1) or maximum (0) capabilities."""
    vhca = await h.vf(size=64 * KiB)
    r = await h.link.query_hca_cap(
        op_mod=(CapType.GENERAL_DEVICE_2 << 1) | HCA_CAP_OPMOD_GET_MAX, function_id=vhca
    )
    assert r.status == CmdStatus.OK, r
    assert r.migration_state is True


async def test_caps_are_settable_per_vf(h):
    """A VF created with VfCaps(migration_state=False) is older firmware: it says so
    in cap_2 while a sibling VF still has every bit."""
    old = await h.vf(size=64 * KiB, caps=VfCaps(migration_state=False))
    new = await h.vf(size=64 * KiB)
    r_old = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_2_CUR, function_id=old)
    r_new = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_2_CUR, function_id=new)
    assert r_old.ok and r_new.ok
    assert r_old.migration_state is False
    assert r_old.migration_in_chunks is True
    assert r_old.migratable is True
    assert r_new.migration_state is True


async def test_caps_without_chunks_or_migratable_are_reported(h):
    """Every capability bit is per VF, in cmd_hca_cap or cmd_hca_cap_2."""
    vhca = await h.vf(size=64 * KiB, caps=VfCaps(migration_in_chunks=False, migratable=False))
    r2 = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_2_CUR, function_id=vhca)
    assert r2.ok, r2
    assert (r2.migration_in_chunks, r2.migratable) == (False, False)
    vhca2 = await h.vf(size=64 * KiB, caps=VfCaps(migration=False))
    r = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_CUR, function_id=vhca2)
    assert r.ok, r
    assert r.migration is False
    assert r.vhca_id == vhca2


async def test_the_pf_itself_has_vhca_id_0_and_every_capability(h):
    """other_function=0 queries the PF: vhca_id 0, everything supported."""
    r = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_CUR, other_function=False)
    assert r.ok, r
    assert r.vhca_id == 0
    assert r.migration is True
    r2 = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_2_CUR, other_function=False)
    assert r2.ok, r2
    assert r2.migration_multi_load and r2.migration_tracking_state and r2.migration_state


@pytest.mark.parametrize("function_id", [0, 2, 99, 0x10000])
async def test_unknown_function_is_bad_param(h, function_id):
    """A function_id naming no VF: BAD_PARAM / UNKNOWN_VHCA."""
    await h.vf(size=64 * KiB)
    r = await h.link.query_hca_cap(op_mod=GENERAL_DEVICE_CUR, function_id=function_id)
    assert (r.status, r.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.UNKNOWN_VHCA)
    assert r.diagnostic


@pytest.mark.parametrize("op_mod", [0x3, 0x5, 0x40 - 1, 0x43, 0xFFFF, 0x10001])
async def test_op_mod_naming_no_capability_is_bad_param(h, op_mod):
    """Only GENERAL_DEVICE (0x0) and GENERAL_DEVICE_2 (0x20) exist here."""
    vhca = await h.vf(size=64 * KiB)
    r = await h.link.query_hca_cap(op_mod=op_mod, function_id=vhca)
    assert (r.status, r.syndrome) == (CmdStatus.BAD_PARAM_ERR, Syndrome.BAD_OP_MOD)

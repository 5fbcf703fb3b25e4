"""Bad command input is answered with a firmware status, never an exception or
a hang: unknown vhca_id, fields wider than their mailbox bits, op_mod not 0,
size 0 or above 2^32-1, unknown mkey."""

from __future__ import annotations

import asyncio

import pytest

from fwemu.link.ifc import CmdStatus, KiB, Syndrome, VfCaps

BAD_PARAM = CmdStatus.BAD_PARAM_ERR
UNKNOWN = 9  # no VF has this vhca_id
TOO_WIDE = 0x10000  # does not fit the 16-bit vhca_id field


async def command(h, name: str, vhca: int, *, op_mod: int = 0, size: int = 64 * KiB, mkey=None):
    """Issue one migration command; its result (the outbox head)."""
    if name == "suspend":
        return await h.suspend(vhca, op_mod)
    if name == "resume":
        return await h.resume(vhca, op_mod)
    if name == "query":
        return await h.query(vhca, op_mod=op_mod)
    if name == "save":
        buf = await h.buffer(64 * KiB)
        pending = await h.save(vhca, size, set_track=True, op_mod=op_mod, buf=buf, mkey=mkey)
        return pending.accepted
    assert name == "load"
    buf = await h.buffer(64 * KiB)
    return await h.link.load_vhca_state(
        vhca, mkey=buf.mkey if mkey is None else mkey, size=size, op_mod=op_mod
    )


async def command_on_a_new_vf(h, name: str, **fields):
    """Issue one command to a new VF in the state it needs (LOAD: fully suspended)."""
    vhca = await h.vf(size=64 * KiB)
    if name == "load":
        await h.suspend_fully(vhca)
    return await command(h, name, vhca, **fields)


COMMANDS = ["suspend", "resume", "query", "save", "load"]


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(
    ("vhca", "syndrome"),
    [
        (UNKNOWN, Syndrome.UNKNOWN_VHCA),
        (0, Syndrome.UNKNOWN_VHCA),
        (TOO_WIDE, Syndrome.FIELD_RANGE),
    ],
    ids=["unknown", "pf", "wider-than-16-bits"],
)
async def test_bad_vhca_id_is_bad_param(h, name, vhca, syndrome):
    """An unknown vhca_id (the PF's 0 included) is BAD_PARAM / UNKNOWN_VHCA; one wider than its 16
    mailbox bits is BAD_PARAM / FIELD_RANGE."""
    await h.vf(size=64 * KiB)
    res = await asyncio.wait_for(command(h, name, vhca), 5)
    assert (res.status, res.syndrome) == (BAD_PARAM, syndrome), res
    assert res.diagnostic


@pytest.mark.parametrize("name", ["query", "save", "load"])
@pytest.mark.parametrize("op_mod", [1, 0xFFFF])
async def test_op_mod_not_0_is_bad_param(h, name, op_mod):
    """QUERY, SAVE and LOAD take op_mod 0 only: anything else is BAD_PARAM / BAD_OP_MOD."""
    res = await command_on_a_new_vf(h, name, op_mod=op_mod)
    assert (res.status, res.syndrome) == (BAD_PARAM, Syndrome.BAD_OP_MOD), res


@pytest.mark.parametrize("name", ["save", "load"])
@pytest.mark.parametrize("size", [0, 1 << 32, (1 << 64) - 1])
async def test_size_0_or_above_32_bits_is_bad_param(h, name, size):
    """size is a 32-bit field of 1..2^32-1: 0 or more is BAD_PARAM / BAD_SIZE."""
    res = await command_on_a_new_vf(h, name, size=size)
    assert (res.status, res.syndrome) == (BAD_PARAM, Syndrome.BAD_SIZE), res


@pytest.mark.parametrize("name", ["save", "load"])
@pytest.mark.parametrize("mkey", [0, 0x4242, 0xFFFF_FFFF])
async def test_unknown_mkey_is_bad_res(h, name, mkey):
    """An unknown mkey is BAD_RES (0x5) / UNKNOWN_MKEY."""
    res = await command_on_a_new_vf(h, name, mkey=mkey, size=4096)
    assert (res.status, res.syndrome) == (CmdStatus.BAD_RES_ERR, Syndrome.UNKNOWN_MKEY), res


async def test_load_range_beyond_the_mkey_is_bad_param(h):
    """va + size beyond the mkey is BAD_PARAM / MKEY_RANGE for LOAD too."""
    vhca = await h.vf(size=64 * KiB)
    await h.suspend_fully(vhca)
    buf = await h.buffer(8 * KiB)
    for va, size in ((0, 8 * KiB + 1), (4 * KiB, 4 * KiB + 1), (1 << 40, 1)):
        res = await h.link.load_vhca_state(vhca, mkey=buf.mkey, size=size, va=va)
        assert (res.status, res.syndrome) == (BAD_PARAM, Syndrome.MKEY_RANGE), (va, size)


async def test_load_of_garbage_bytes_is_refused_not_raised(h):
    """Bytes that are no image are refused with BAD_PARAM; the VF is unchanged."""
    vhca = await h.vf(size=64 * KiB)
    await h.suspend_fully(vhca)
    before = await h.digest(vhca)
    for junk in (bytes(64), b"\xff" * 4096, b"VHCA" + bytes(100)):
        res = await h.load(vhca, junk)
        assert res.status == BAD_PARAM, res
        assert res.syndrome in (
            Syndrome.IMAGE_BAD_MAGIC,
            Syndrome.IMAGE_CHECKSUM,
            Syndrome.IMAGE_TRUNCATED,
        )
    assert await h.digest(vhca) == before


@pytest.mark.parametrize(
    "caps",
    [VfCaps(migration=False), VfCaps(migratable=False)],
    ids=["migration", "migratable"],
)
@pytest.mark.parametrize("name", COMMANDS)
async def test_vf_without_migration_caps_refuses_migration_commands(h, caps, name):
    """A function without cmd_hca_cap.migration or cap_2.migratable does no
    migration command: BAD_OP (0x2) / NOT_MIGRATABLE."""
    vhca = await h.vf(size=64 * KiB, caps=caps)
    res = await command(h, name, vhca)
    assert (res.status, res.syndrome) == (CmdStatus.BAD_OP_ERR, Syndrome.NOT_MIGRATABLE), res
    assert res.status == 0x2


async def test_vf_without_tracking_cap_refuses_set_track_only(h):
    """Without cap_2.migration_tracking_state a SAVE with set_track is BAD_PARAM /
    CAP_MISSING; the firmware still saves without tracking (mlx5vf itself would
    not enable migration on such a function: that is the driver's rule)."""
    vhca = await h.vf(size=64 * KiB, caps=VfCaps(migration_tracking_state=False))
    res = await command(h, "save", vhca)
    assert (res.status, res.syndrome) == (BAD_PARAM, Syndrome.CAP_MISSING), res
    await h.suspend_fully(vhca)
    assert await h.save_ok(vhca, (await h.query(vhca)).required_umem_size)

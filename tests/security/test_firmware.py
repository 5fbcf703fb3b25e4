"""The firmware's trust boundary (issue 12, items 4 and 5), against `fwemu
serve` with mutual TLS while the victim migrates through the driver:

* a tenant may not use the Firmware service: FLR, SUSPEND_VHCA, SAVE, the
  mkey RPCs, completions, SetVfHolders are PERMISSION_DENIED (a denial, no
  outbox), so it can neither stop nor reset the victim's VF, nor claim it;
* RemoveVf and CreateVfs are the admins': PERMISSION_DENIED, holders too;
* on the Scenario service a VF the caller does not hold answers as one that
  does not exist (NOT_FOUND, NO_SUCH_VF): no digest, reconfiguration or
  fault reaches the victim's VFs, and ListVfs does not show them;
* mkeys belong to the principal that made them: another driver's or the
  admin's ReadMkey, WriteMkey, DestroyMkey get BAD_RES, and guessing ids the
  way they used to be issued (sequentially) reaches none of the driver's;
* CreateMkey does not follow a symbolic link (with mutual TLS and without),
  nor map a file with another name (BAD_PARAM / SEGMENT_REFUSED).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fwemu.api.v1 import firmware_pb2 as fpb
from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.hostmem import create_segment, default_shm_dir
from fwemu.link.ifc import CmdStatus, FaultKind, Opcode, SuspendOpMod, Syndrome
from tests.security.rig import (
    ADMIN,
    ATTACKER,
    DRIVER,
    OTHER_DRIVER,
    VICTIM,
    Parties,
    Victim,
    denied,
)

pytestmark = pytest.mark.grpc

DENIED = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
NO_SUCH_VF = (grpc.StatusCode.NOT_FOUND, "NO_SUCH_VF")
LENGTH = 64 * 1024
PATTERN = secrets.token_bytes(LENGTH)


async def _chunks(mkey: int, data: bytes) -> AsyncIterator[fpb.MkeyData]:
    yield fpb.MkeyData(mkey=mkey, offset=0, data=data)


async def _read(stub: Any, mkey: int, length: int = LENGTH) -> bytes:
    out = b""
    async for m in stub.ReadMkey(fpb.ReadMkeyRequest(mkey=mkey, length=length)):
        out += m.data
    return out


async def test_a_tenant_may_not_use_the_firmware_service(mtls: Parties) -> None:
    """Every Firmware RPC that would hurt the victim's migration, sent by the
    attacker on the victim's VFs: PERMISSION_DENIED; the victim completes."""
    v = await Victim.start(mtls, await mtls.vfio(VICTIM))
    fw = mtls.firmware(ATTACKER)
    src, dst = v.src.vhca_id, v.dst.vhca_id
    calls: dict[str, Any] = {
        "FunctionLevelReset": lambda: fw.FunctionLevelReset(
            fpb.FunctionLevelResetRequest(vhca_id=src)
        ),
        "SuspendVhca": lambda: fw.SuspendVhca(
            fpb.SuspendVhcaRequest(vhca_id=src, op_mod=SuspendOpMod.SUSPEND_INITIATOR)
        ),
        "SaveVhcaState": lambda: fw.SaveVhcaState(
            fpb.SaveVhcaStateRequest(vhca_id=src, mkey=1, size=LENGTH)
        ),
        "LoadVhcaState": lambda: fw.LoadVhcaState(
            fpb.LoadVhcaStateRequest(vhca_id=dst, mkey=1, size=LENGTH)
        ),
        "CreateMkey": lambda: fw.CreateMkey(fpb.CreateMkeyRequest(length=LENGTH, remote=True)),
        "ReadMkey": lambda: fw.ReadMkey(fpb.ReadMkeyRequest(mkey=1, length=LENGTH)),
        "WriteMkey": lambda: fw.WriteMkey(_chunks(1, b"\0" * 4096)),
        "DestroyMkey": lambda: fw.DestroyMkey(fpb.DestroyMkeyRequest(mkey=1)),
        "Completions": lambda: fw.Completions(fpb.CompletionsRequest()),
        "SetVfHolders": lambda: fw.SetVfHolders(
            fpb.SetVfHoldersRequest(
                vhca_id=src,
                principals=[mtls.stack.pki.principal(ATTACKER)],  # type: ignore[union-attr]
            )
        ),
    }
    for name, call in calls.items():
        info = await denied(call(), *DENIED)
        assert "may not use the Firmware service" in info.message, name
    # SetVfHolders was refused: the attacker still reaches nothing of the VF.
    await denied(mtls.scenario(ATTACKER).GetDigest(spb.GetDigestRequest(vhca_id=src)), *NO_SUCH_VF)
    await v.drain()
    await v.finish()


async def test_removing_or_creating_vfs_is_the_admins(mtls: Parties) -> None:
    """RemoveVf of the victim's VF by the attacker, or by the victim itself
    (a holder), and CreateVfs by either: PERMISSION_DENIED."""
    v = await Victim.start(mtls, await mtls.vfio(VICTIM))
    for who in (ATTACKER, VICTIM):
        scenario = mtls.scenario(who)
        for vf in (v.src, v.dst):
            await denied(scenario.RemoveVf(spb.RemoveVfRequest(vhca_id=vf.vhca_id)), *DENIED)
        await denied(scenario.CreateVfs(spb.CreateVfsRequest(count=1)), *DENIED)
    await v.drain()
    await v.finish()


async def test_scenario_on_a_vf_the_attacker_does_not_hold_is_no_such_vf(mtls: Parties) -> None:
    """Digests, reconfigurations, faults, configuration on the victim's VFs:
    NOT_FOUND, exactly as for a VF that does not exist; ListVfs shows none
    of them.  The victim reaches its own (its holder access gives the
    digests) and completes."""
    v = await Victim.start(mtls, await mtls.vfio(VICTIM))
    attacker, mine = mtls.scenario(ATTACKER), mtls.scenario(VICTIM)
    absent = 60000
    fault = spb.Fault(kind=FaultKind.FAIL, opcode=Opcode.SAVE_VHCA_STATE, status=1, count=100)

    def calls(vhca_id: int) -> dict[str, Any]:
        return {
            "GetVf": lambda: attacker.GetVf(spb.GetVfRequest(vhca_id=vhca_id)),
            "GetDigest": lambda: attacker.GetDigest(spb.GetDigestRequest(vhca_id=vhca_id)),
            "ConfigureVf": lambda: attacker.ConfigureVf(
                spb.ConfigureVfRequest(vhca_id=vhca_id, config=spb.VfConfig(dirty_bytes_per_s=1))
            ),
            "Reconfigure": lambda: attacker.Reconfigure(spb.ReconfigureRequest(vhca_id=vhca_id)),
            "InjectFault": lambda: attacker.InjectFault(
                spb.InjectFaultRequest(vhca_id=vhca_id, fault=fault)
            ),
            "ClearFaults": lambda: attacker.ClearFaults(spb.ClearFaultsRequest(vhca_id=vhca_id)),
        }

    for vf in (v.src, v.dst):
        for name, call in calls(vf.vhca_id).items():
            got = await denied(call(), *NO_SUCH_VF)
            none = await denied(calls(absent)[name](), *NO_SUCH_VF)
            assert got.message == none.message.replace(str(absent), str(vf.vhca_id)), name
            assert got.metadata == {
                k: val.replace(str(absent), str(vf.vhca_id)) for k, val in none.metadata.items()
            }, name
    listed = {i.vhca_id for i in (await attacker.ListVfs(spb.ListVfsRequest())).vfs}
    assert not listed & {v.src.vhca_id, v.dst.vhca_id}
    held = {i.vhca_id for i in (await mine.ListVfs(spb.ListVfsRequest())).vfs}
    assert held == {v.src.vhca_id, v.dst.vhca_id}
    await v.drain()
    await v.finish()


async def test_another_principals_mkey_is_bad_res(mtls: Parties) -> None:
    """An mkey of the driver's principal: another driver (OTHER_DRIVER, which
    may use the Firmware service) and the admin get BAD_RES from ReadMkey,
    WriteMkey and DestroyMkey, and the driver still reads its bytes; the
    other way round too."""
    owner, intruders = mtls.firmware(DRIVER), [mtls.firmware(OTHER_DRIVER), mtls.firmware(ADMIN)]
    theirs = mtls.firmware(OTHER_DRIVER)
    for mine, others in ((owner, intruders), (theirs, [owner])):
        r = await mine.CreateMkey(fpb.CreateMkeyRequest(length=LENGTH, remote=True))
        assert r.status == CmdStatus.OK, r
        assert (await mine.WriteMkey(_chunks(r.mkey, PATTERN))).bytes_written == LENGTH
        for other in others:
            info = await denied(
                other.ReadMkey(fpb.ReadMkeyRequest(mkey=r.mkey, length=LENGTH)),
                grpc.StatusCode.OUT_OF_RANGE,
                "MKEY_RANGE",
            )
            assert info.metadata["status"] == str(CmdStatus.BAD_RES_ERR.value)
            w = await other.WriteMkey(_chunks(r.mkey, b"\xff" * 4096))
            d = await other.DestroyMkey(fpb.DestroyMkeyRequest(mkey=r.mkey))
            for answer in (w, d):
                assert (answer.status, answer.syndrome) == (
                    CmdStatus.BAD_RES_ERR,
                    Syndrome.UNKNOWN_MKEY,
                )
        assert await _read(mine, r.mkey) == PATTERN
        assert (await mine.DestroyMkey(fpb.DestroyMkeyRequest(mkey=r.mkey))).status == 0


async def test_guessing_the_drivers_mkeys_reaches_none(mtls: Parties) -> None:
    """While the victim's migration holds buffers in the firmware (the
    driver's mkeys), another driver reads and destroys every id the old
    sequential scheme would have issued first, and random ones: BAD_RES
    each time, and the victim's migration completes."""
    v = await Victim.start(mtls, await mtls.vfio(VICTIM))
    other = mtls.firmware(OTHER_DRIVER)
    guesses = [*range(1, 129), *(secrets.randbits(32) for _ in range(64))]
    for mkey in guesses:
        await denied(
            other.ReadMkey(fpb.ReadMkeyRequest(mkey=mkey, length=4096)),
            grpc.StatusCode.OUT_OF_RANGE,
            "MKEY_RANGE",
        )
        d = await other.DestroyMkey(fpb.DestroyMkeyRequest(mkey=mkey))
        assert d.status == CmdStatus.BAD_RES_ERR, (mkey, d)
    await v.drain()
    await v.finish()


@contextlib.contextmanager
def _names() -> Iterator[list[Path]]:
    """Names placed in the firmware's shm directory, removed afterwards."""
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def test_create_mkey_follows_no_symlink_and_maps_no_second_name(
    either: Parties, tmp_path: Path
) -> None:
    """A driver's CreateMkey of a symbolic link in the firmware's shm
    directory (to a file outside it, or to a segment inside it) or of a file
    with a second name: BAD_PARAM / SEGMENT_REFUSED, nothing mapped, the
    file outside unchanged and not quoted.  With mutual TLS (as the driver)
    and without (anonymous)."""
    secret = b"root-only: " + secrets.token_hex(16).encode()
    outside = tmp_path / "secret"
    outside.write_bytes(secret.ljust(LENGTH, b"\0"))
    outside.chmod(0o600)
    shm = Path(default_shm_dir())
    fw = either.firmware(DRIVER)
    seg = create_segment(LENGTH, str(shm), prefix="test-security")
    try:
        with _names() as made:
            tag = secrets.token_hex(8)
            out, inside, second = (shm / f"test-security-{k}-{tag}" for k in ("out", "in", "ln"))
            made += [out, inside, second, shm / seg.name]
            out.symlink_to(outside)
            inside.symlink_to(shm / seg.name)
            os.link(shm / seg.name, second)
            for path in (out, inside, second, shm / seg.name):
                r = await fw.CreateMkey(fpb.CreateMkeyRequest(length=LENGTH, shm_name=path.name))
                assert (r.status, r.syndrome) == (
                    CmdStatus.BAD_PARAM_ERR,
                    Syndrome.SEGMENT_REFUSED,
                ), (path.name, r)
                assert r.mkey == 0 and secret.decode()[:8] not in r.diagnostic
            second.unlink()
            # Its one name again: the driver's own segment is mapped.
            r = await fw.CreateMkey(fpb.CreateMkeyRequest(length=LENGTH, shm_name=seg.name))
            assert r.status == CmdStatus.OK, r
            assert (await fw.DestroyMkey(fpb.DestroyMkeyRequest(mkey=r.mkey))).status == 0
    finally:
        seg.close()
    assert outside.read_bytes() == secret.ljust(LENGTH, b"\0")

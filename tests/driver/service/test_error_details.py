"""A failed firmware command's outbox on the wire: besides the errno that
mlx5_cmd_check makes of it, the ErrorInfo metadata carries the firmware's
`status` and `syndrome` as numbers, so a client tells one firmware refusal
from another without parsing the message."""

from __future__ import annotations

import errno

import pytest

from driver.vfio.uapi import MigState
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, Opcode
from tests.support.driver_service import DriverUnderTest, VfioCallError, VfioClient

pytestmark = pytest.mark.grpc


async def test_a_failed_command_carries_its_status_and_syndrome(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    (vf,) = await drv.create_vfs()
    fd = await client.open_device(vf.name)
    await drv.link.inject_fault(
        vf.vhca_id,
        Fault(
            FaultKind.FAIL,
            opcode=Opcode.SUSPEND_VHCA,
            status=CmdStatus.BAD_RES_STATE_ERR,
            syndrome=0x1234ABCD,
        ),
    )
    with pytest.raises(VfioCallError) as e:
        await client.set_state(fd, MigState.STOP)
    md = e.value.info.metadata
    assert md["errno"] == str(errno.EINVAL)  # cmd_status_to_err(BAD_RES_STATE_ERR)
    assert (md["status"], md["syndrome"]) == (str(0x9), str(0x1234ABCD))


async def test_an_errno_of_the_vfio_core_carries_no_firmware_fields(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """Only a firmware outbox has a status and a syndrome: a refusal of the
    VFIO core (an arc the FSM does not allow) has the errno alone."""
    (vf,) = await drv.create_vfs()
    fd = await client.open_device(vf.name)
    with pytest.raises(VfioCallError) as e:
        await client.set_state(fd, MigState.ERROR)  # no user may ask for ERROR
    md = e.value.info.metadata
    assert md["errno"] == str(errno.EINVAL)
    assert "status" not in md and "syndrome" not in md

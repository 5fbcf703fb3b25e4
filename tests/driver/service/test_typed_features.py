"""The typed form of VFIO_DEVICE_FEATURE (TypedFeature): the same ioctl as
the raw struct bytes, packed by the driver.  Every op combination of every
migration feature answers as its raw form does, errno for errno and byte for
byte; the typed answer says the same as the raw struct; and a request that
mixes the forms, or names no feature, is refused with EINVAL."""

from __future__ import annotations

import errno
import itertools
import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from driver.api.v1 import vfio_pb2 as pb
from driver.vfio.uapi import (
    MIG_DATA_SIZE,
    MIG_STATE,
    MIGRATION,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    Feature,
    MigState,
)
from grpcsvc.errors import error_info
from tests.support.driver_service import DriverUnderTest, VfioClient

pytestmark = pytest.mark.grpc

# oneof field -> (feature, what its raw GET/SET sends: QEMU's pre-sized struct)
FEATURES: dict[str, tuple[Feature, bytes]] = {
    "migration": (Feature.MIGRATION, bytes(MIGRATION.size)),
    "mig_device_state": (Feature.MIG_DEVICE_STATE, MIG_STATE.pack(MigState.RUNNING, -1)),
    "mig_data_size": (Feature.MIG_DATA_SIZE, bytes(MIG_DATA_SIZE.size)),
    "mig_precopy_info_v2": (Feature.MIG_PRECOPY_INFOv2, b""),
}
OPS = list(itertools.product((False, True), repeat=3))  # get, set, probe


def typed_request(fd: int, which: str, get: bool, set_: bool, probe: bool) -> Any:
    t = pb.TypedFeature(get=get, set=set_, probe=probe)
    if which == "mig_device_state":
        t.mig_device_state.device_state = pb.DEVICE_MIG_STATE_RUNNING  # RUNNING->RUNNING: no arc
    else:
        getattr(t, which).SetInParent()
    return pb.DeviceFeatureRequest(fd=fd, typed=t)


async def answer(client: VfioClient, request: Any) -> tuple[int, Any]:
    """(errno or 0, the response or None)."""
    try:
        return 0, await client.stub.DeviceFeature(request, metadata=client.metadata)
    except grpc.aio.AioRpcError as e:
        return int(error_info(e).metadata["errno"]), None


@pytest.mark.parametrize("which", FEATURES)
async def test_every_op_of_every_migration_feature_answers_as_its_raw_form(
    drv: DriverUnderTest, client: VfioClient, which: str
) -> None:
    _, fd = await drv.open_vf(client)
    feature, payload = FEATURES[which]
    for get, set_, probe in OPS:
        flags = int(feature)
        flags |= VFIO_DEVICE_FEATURE_GET if get else 0
        flags |= VFIO_DEVICE_FEATURE_SET if set_ else 0
        flags |= VFIO_DEVICE_FEATURE_PROBE if probe else 0
        raw = pb.DeviceFeatureRequest(fd=fd, argsz=8 + len(payload), flags=flags, data=payload)
        raw_errno, raw_answer = await answer(client, raw)
        typed_errno, typed_answer = await answer(client, typed_request(fd, which, get, set_, probe))
        case = f"{which} get={get} set={set_} probe={probe}"
        assert typed_errno == raw_errno, case
        if raw_answer is None:
            continue
        assert typed_answer.data == raw_answer.data, case
        assert typed_answer.data_fd == raw_answer.data_fd == -1, case
        assert typed_answer.HasField("typed") == (not probe), case


async def test_typed_answers_say_what_the_raw_structs_say(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    _, fd = await drv.open_vf(client)

    async def typed(which: str, *, get: bool = False, set_: bool = False, **fields: Any) -> Any:
        t = pb.TypedFeature(get=get, set=set_)
        if fields:
            getattr(t, which).CopyFrom(type(getattr(t, which))(**fields))
        else:
            getattr(t, which).SetInParent()
        return await client.stub.DeviceFeature(
            pb.DeviceFeatureRequest(fd=fd, typed=t), metadata=client.metadata
        )

    mig = (await typed("migration", get=True)).typed.migration
    (flags,) = MIGRATION.unpack(
        (
            await client.device_feature(
                fd, 16, VFIO_DEVICE_FEATURE_GET | Feature.MIGRATION, bytes(8)
            )
        ).data
    )
    assert mig.flags == flags
    assert (mig.stop_copy, mig.p2p, mig.pre_copy) == (True, True, True)  # mlx5 with all caps

    # Opt in, then go to PRE_COPY: the data fd is in both places of the answer.
    assert (await typed("mig_precopy_info_v2", set_=True)).typed.HasField("mig_precopy_info_v2")
    r = await typed("mig_device_state", set_=True, device_state=pb.DEVICE_MIG_STATE_PRE_COPY)
    assert r.typed.mig_device_state.device_state == pb.DEVICE_MIG_STATE_PRE_COPY
    assert r.typed.mig_device_state.data_fd == r.data_fd >= 3
    now = (await typed("mig_device_state", get=True)).typed.mig_device_state
    assert now.device_state == pb.DEVICE_MIG_STATE_PRE_COPY
    # The opt-in took: precopy info flags come back cleared, not echoed (v1).
    info = await client.precopy_info(r.data_fd, flags=0xA5A50000)
    assert info.flags & ~pb.PRECOPY_INFO_FLAG_REINIT == 0
    size = (await typed("mig_data_size", get=True)).typed.mig_data_size.stop_copy_length
    raw = await client.device_feature(
        fd, 16, VFIO_DEVICE_FEATURE_GET | Feature.MIG_DATA_SIZE, bytes(8)
    )
    assert size == MIG_DATA_SIZE.unpack(raw.data)[0] > 0
    await client.close(r.data_fd)
    done = await typed("mig_device_state", set_=True, device_state=pb.DEVICE_MIG_STATE_RUNNING)
    assert done.typed.mig_device_state.data_fd == done.data_fd == -1


@pytest.mark.parametrize(
    "fields",
    [
        {"argsz": 16},
        {"flags": VFIO_DEVICE_FEATURE_GET | Feature.MIGRATION},
        {"data": bytes(8)},
    ],
    ids=["argsz", "flags", "data"],
)
async def test_a_typed_request_with_raw_fields_is_refused(
    drv: DriverUnderTest, client: VfioClient, fields: dict[str, Any]
) -> None:
    _, fd = await drv.open_vf(client)
    request = typed_request(fd, "migration", True, False, False)
    for name, value in fields.items():
        setattr(request, name, value)
    code, _ = await answer(client, request)
    assert code == errno.EINVAL


async def test_a_typed_request_naming_no_feature_is_refused(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    _, fd = await drv.open_vf(client)
    request = pb.DeviceFeatureRequest(fd=fd, typed=pb.TypedFeature(get=True))
    code, _ = await answer(client, request)
    assert code == errno.EINVAL
    # A well-formed typed request on an fd that is not open: EBADF, as raw.
    code, _ = await answer(client, typed_request(99, "migration", True, False, False))
    assert code == errno.EBADF


async def test_the_readmes_typed_json_example_does_what_it_says(
    drv: DriverUnderTest, client: VfioClient
) -> None:
    """README, "The API": the grpcurl JSON of a typed SET to PRE_COPY, and its answer."""
    text = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = text.split("**Typed features.**", 1)[1].split("**Errors**", 1)[0]
    request_json, answer_json = re.findall(r"`(\{[^`]*\})`", section.replace("\n", " "))
    _, fd = await drv.open_vf(client)
    assert fd == 3  # the fd of the example
    request = json_format.Parse(request_json, pb.DeviceFeatureRequest())
    response = await client.stub.DeviceFeature(request, metadata=client.metadata)
    got = json.loads(json_format.MessageToJson(response))
    assert got == json.loads(answer_json)


@pytest.mark.parametrize("state", [-1, 8, 99, 2**31 - 1, -(2**31)])
async def test_an_absurd_typed_state_is_refused_as_the_raw_struct_would_be(
    drv: DriverUnderTest, client: VfioClient, state: int
) -> None:
    """device_state is a u32 in the struct: what an ioctl caller's value
    becomes there (-1: 0xffffffff) reaches the kernel's check, EINVAL, and
    the device stays as it was."""
    _, fd = await drv.open_vf(client)
    t = pb.TypedFeature(set=True)
    t.mig_device_state.device_state = state  # type: ignore[assignment]
    code, _ = await answer(client, pb.DeviceFeatureRequest(fd=fd, typed=t))
    raw = MIG_STATE.pack(state & 0xFFFFFFFF, -1)[:4] + MIG_STATE.pack(0, -1)[4:]
    raw_code, _ = await answer(
        client,
        pb.DeviceFeatureRequest(
            fd=fd, argsz=16, flags=VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE, data=raw
        ),
    )
    assert code == raw_code == errno.EINVAL
    assert await client.get_state(fd) == MigState.RUNNING

"""Shared harness of the mlx5vf behaviour tests (tests/driver/mlx5/).

Devices are built the way driver/registry.py builds them: a `Firmware` model,
a firmware link, a `DeviceRegistry(link)` and `refresh()`.  The same tests run
against both firmware adapters behind the one FirmwareLink interface (the
`mlx5` fixture is parametrized):

* ``inproc``: `InProcessLink(Firmware(clock))`;
* ``grpc``: a real `FirmwareServer(fw)` on 127.0.0.1:0 reached with
  `GrpcLink.connect(...)`, whose completion stream drives the driver's SAVE
  callbacks (host memory: shared memory the firmware maps);
* ``grpc-remote`` (only the `mlx5_wide` fixture, for the tests that move whole
  streams): the same with the firmware holding host memory, so the driver's
  dma_sync_for_cpu / dma_sync_for_device really move the image bytes.

Between the driver and the adapter sits a `RecordingLink` (recording.py) that
records every firmware command mlx5vf issues (and the answer), so the arc ->
command tables of the reference (§5.7) can be checked; everything else about
the firmware is observed through the link's scenario side (get_vf, digest), in
both modes.

The uAPI is driven like ioctls (devices.py): `VfioDevice.device_feature(argsz,
flags, data, user=UserMemory({}), install_fd=...)` with the struct layouts of
driver/vfio/uapi.py, and the data files with read/write/ioctl/release
(stream.py moves whole streams).

tests/driver/mlx5/conftest.py defines the fixtures (`mlx5`, `mlx5_wide`,
`mlx5_inproc`); the tests use this package as one namespace
(`from tests.support import mlx5 as h`).

Clocks: `mlx5()` runs the firmware on the event loop's clock (SAVEs complete
by themselves after their latency); `mlx5("virtual")` on a VirtualClock, where a
SAVE stays in flight until the test moves the clock (`env.advance`,
`env.settle`, or `set_state`, which moves it by 0 while an arc waits).
"""

from tests.support.mlx5.devices import (
    ADAPTERS,
    REMOTE,
    Dev,
    Factory,
    Info,
    Mlx5Env,
    S,
    environments,
    pages,
    precopy_info,
    vf_config,
)
from tests.support.mlx5.recording import Cmd, RecordingLink
from tests.support.mlx5.stream import (
    FLAG_OPTIONAL,
    IMAGE_HEADER,
    REC_HEADER,
    STOP_COPY_SIZE_RECORD,
    TAG_FW_DATA,
    TAG_STOP_COPY_SIZE,
    Record,
    load_stream,
    migrate_stopped,
    parse_stream,
    pre_copy_stream,
    precopy_with_dirt,
    read_available,
    read_to_eof,
    record,
    write_all,
)
from tests.support.vfio_fakes import GET, P2P, PRE, PROBE, SC, SET, raises_errno

__all__ = [
    "ADAPTERS",
    "FLAG_OPTIONAL",
    "GET",
    "IMAGE_HEADER",
    "P2P",
    "PRE",
    "PROBE",
    "REC_HEADER",
    "REMOTE",
    "SC",
    "SET",
    "STOP_COPY_SIZE_RECORD",
    "TAG_FW_DATA",
    "TAG_STOP_COPY_SIZE",
    "Cmd",
    "Dev",
    "Factory",
    "Info",
    "Mlx5Env",
    "Record",
    "RecordingLink",
    "S",
    "environments",
    "load_stream",
    "migrate_stopped",
    "pages",
    "parse_stream",
    "pre_copy_stream",
    "precopy_info",
    "precopy_with_dirt",
    "raises_errno",
    "read_available",
    "read_to_eof",
    "record",
    "vf_config",
    "write_all",
]

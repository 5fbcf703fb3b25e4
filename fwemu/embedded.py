"""The embedded mode's composition root: a firmware model in the driver's
process, the link the driver reaches it through, and what a driver server adds
for it (the Scenario service on its port, the firmware's metrics).

The driver uses this and the link's interface only, never the model's types.
"""

from __future__ import annotations

import argparse

import grpc
from prometheus_client.registry import Collector

from grpcsvc.access import Roles
from grpcsvc.units import byte_size

from .api.v1 import scenario_pb2_grpc as sgrpc
from .link.ifc import VfConfig
from .link.inproc import InProcessLink
from .model import Firmware, LoopClock
from .model.memory import OutOfMemory, machine_memory
from .scenario import ScenarioError, build_firmware
from .service.metrics import FirmwareCollector
from .service.server import SCENARIO_SERVICE
from .service.servicers import ScenarioServicer

__all__ = ["SCENARIO_SERVICE", "EmbeddedFirmware", "ScenarioError", "memory_limit_arg"]


def memory_limit_arg(text: str) -> int:
    """argparse type of `--memory-limit` (fwemu serve, vfio-driver serve's
    embedded firmware): a size from 1 byte to the machine's memory.  VF state
    is real memory, so a limit past it (a typo: 64TiB for 64GiB) would let the
    firmware allocate until the OOM killer ends it, and every client's VFs."""
    n = byte_size(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the memory limit must be positive")
    total = machine_memory()
    if n > total:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than this machine's memory ({total} bytes: its RAM, "
            "or its cgroup's limit if lower)"
        )
    return n


class EmbeddedFirmware:
    """One firmware model served to a driver in the same process."""

    scenario_service = SCENARIO_SERVICE  # its name, for health and reflection

    def __init__(self, fw: Firmware) -> None:
        self._fw = fw
        self.link = InProcessLink(fw)

    @classmethod
    def build(
        cls,
        *,
        size: int,
        dirty_rate: int,
        seed: int,
        scenario: str | None,
        vfs: int | None,
        memory_limit: int | None = None,
    ) -> EmbeddedFirmware:
        """The firmware `fwemu serve` builds from the same options (bad ones
        raise ScenarioError).  `memory_limit`: bytes of VF state the firmware
        may hold (default: from the machine's memory)."""
        defaults = VfConfig(size=size, dirty_bytes_per_s=dirty_rate)
        fw = build_firmware(LoopClock(), defaults, seed=seed, scenario=scenario, vfs=vfs)
        if memory_limit is not None:
            try:
                fw.memory.set_limit(memory_limit)
            except (OutOfMemory, ValueError) as e:
                raise ScenarioError(f"memory limit: {e}") from None
        return cls(fw)

    def add_scenario_servicer(self, server: grpc.aio.Server, roles: Roles | None = None) -> None:
        """Serve the firmware's Scenario service (digests, reconfigurations,
        faults) on `server`, as `fwemu serve` does: admins of `roles` reach
        every VF, anyone else the VFs whose device it holds (as the driver
        tells the link, set_vf_holders).  Default: everyone without a client
        certificate may do anything, as before TLS."""
        sgrpc.add_ScenarioServicer_to_server(ScenarioServicer(self._fw, roles), server)

    def collector(self) -> Collector:
        """The firmware's metrics, for the driver's registry."""
        return FirmwareCollector(self._fw)

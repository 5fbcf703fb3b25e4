"""Devices for load-test users, leased so that no two users share one.

A pool creates its VFs on demand through Scenario (so users of other
processes, workers of the same distributed run, never see them), hands each
to one user at a time, takes them back, and removes them when it closes.
VFs of different shapes (a workload or none) come from different pools.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vfioclient.sync import SyncVfioClient

from .scenario import SyncScenario, Vf

LIST_POLL_S = 0.05
LIST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Device:
    """A leased VF: its firmware id and its VFIO device name on the driver."""

    vhca_id: int
    name: str


class DevicePool:
    def __init__(
        self,
        scenario: SyncScenario,
        lister: Callable[[], SyncVfioClient],
        config: dict[str, Any],
        *,
        shard: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`lister`: a client to list the driver's devices with (the names of
        new VFs); `config`: the VfConfig fields of this pool's VFs; `shard`:
        which of the driver's firmwares Scenario is, the PCI domain of its
        devices (shards number their VFs alike: only the domain tells)."""
        self.scenario = scenario
        self.domain = f"{shard:04x}:"
        self.lister = lister
        self.config = config
        self.sleep = sleep
        self.free: list[Device] = []
        self.created: list[Device] = []
        self._lock = threading.Lock()

    def lease(self, count: int) -> list[Device]:
        with self._lock:
            taken, self.free = self.free[:count], self.free[count:]
        if len(taken) < count:
            try:
                taken += self._create(count - len(taken))
            except BaseException:
                self.give_back(taken)
                raise
        return taken

    def give_back(self, devices: list[Device]) -> None:
        with self._lock:
            self.free.extend(devices)

    def close(self) -> None:
        """Remove every VF this pool made (leased ones too: the run is over)."""
        with self._lock:
            created, self.created, self.free = self.created, [], []
        for d in created:
            with contextlib.suppress(OSError):  # already gone with its firmware
                self.scenario.remove_vf(d.vhca_id)

    def _create(self, count: int) -> list[Device]:
        vfs = self.scenario.create_vfs(count, **self.config)
        devices = self._named(vfs)
        with self._lock:
            self.created.extend(devices)
        return devices

    def _named(self, vfs: list[Vf]) -> list[Device]:
        """The driver's names of new VFs (it lists them once it refreshed)."""
        deadline = time.monotonic() + LIST_TIMEOUT_S
        while True:
            names = {
                (d.vhca_id, d.function_id): d.name
                for d in self.lister().list_devices()
                if d.name.startswith(self.domain)
            }
            found = [names.get((v.vhca_id, v.function_id)) for v in vfs]
            if all(found):
                return [Device(v.vhca_id, n) for v, n in zip(vfs, found, strict=True) if n]
            if time.monotonic() > deadline:
                raise OSError(
                    errno.ENOENT,
                    f"the driver does not list the VFs {[v.vhca_id for v in vfs]} Scenario "
                    f"made at {self.scenario.target} in PCI domain {self.domain[:-1]}: is "
                    "--scenario the firmware of --driver, and --shard its shard?",
                )
            self.sleep(LIST_POLL_S)

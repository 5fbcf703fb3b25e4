"""The Locust side of vfio-loadtest: one User class per flow (vfioload/flows.py).

Run through `vfio-loadtest` (vfioload/cli.py), which sets the environment
this file reads: VFIO_LOADTEST_DRIVER, VFIO_LOADTEST_SCENARIO,
VFIO_LOADTEST_MIX (class weights), VFIO_LOADTEST_VF_SIZE, and VFIO_TLS_*
for TLS.  Locust runs users as gevent greenlets: gRPC's gevent integration
is initialised before any channel exists, and the clients use gRPC's
synchronous API (vfioclient.sync).

Each user leases its devices from its process's pool (VFs made on demand
through Scenario, removed when the run stops), so no two users share one,
whichever worker they run on.  Every RPC, every measured moment (REINIT
detection, re-arm, downtime, migration) and every failure (missed or
spurious REINIT, a wrong errno, a digest mismatch) is a Locust request
event, under the user class's name as its type.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from typing import Any, ClassVar

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, events  # noqa: E402
from locust.env import Environment  # noqa: E402

from vfioclient.sync import SyncVfioClient  # noqa: E402
from vfioclient.transport import FROM_ENV, resolve_tls  # noqa: E402
from vfioload.flows import FLOWS, Flow  # noqa: E402
from vfioload.mix import CLASS_NAMES, DEFAULT_MIX, parse_mix  # noqa: E402
from vfioload.pool import DevicePool  # noqa: E402
from vfioload.scenario import SyncScenario  # noqa: E402

log = logging.getLogger("vfio-loadtest")

DRIVER = os.environ.get("VFIO_LOADTEST_DRIVER", "127.0.0.1:50052")
SCENARIO = os.environ.get("VFIO_LOADTEST_SCENARIO") or DRIVER
VF_SIZE = int(os.environ.get("VFIO_LOADTEST_VF_SIZE", str(1 << 20)))
RECONFIG_BYTES = int(os.environ.get("VFIO_LOADTEST_RECONFIG_BYTES", str(64 << 10)))
SHARD = int(os.environ.get("VFIO_LOADTEST_SHARD", "0"))
MIX = parse_mix(os.environ.get("VFIO_LOADTEST_MIX", DEFAULT_MIX))

# The VFs of each flow: no workload for the flows that count REINITs and
# errnos (a dirty page is not a reconfiguration), some for migrations.
WORKLOAD = {"migration": 256 << 10}


class _Shared:
    """What the users of one process share: the Scenario client, a client
    that lists devices, and a pool of VFs per flow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.scenario: SyncScenario | None = None
        self.lister: SyncVfioClient | None = None
        self.pools: dict[str, DevicePool] = {}

    def pool(self, kind: str) -> DevicePool:
        with self._lock:
            if self.scenario is None:
                self.scenario = SyncScenario(SCENARIO, resolve_tls(FROM_ENV))
            if kind not in self.pools:
                config = {
                    "size": VF_SIZE,
                    "dirty_bytes_per_s": WORKLOAD.get(kind, 0),
                    "reconfig_bytes": RECONFIG_BYTES,
                }
                self.pools[kind] = DevicePool(self.scenario, self._lister, config, shard=SHARD)
            return self.pools[kind]

    def _lister(self) -> SyncVfioClient:
        if self.lister is None:
            self.lister = SyncVfioClient.connect(DRIVER)
        return self.lister

    def close(self) -> None:
        with self._lock:
            pools, self.pools = list(self.pools.values()), {}
            for p in pools:
                p.close()
            if self.lister is not None:
                self.lister.close_client()
                self.lister = None
            if self.scenario is not None:
                self.scenario.close()
                self.scenario = None


SHARED = _Shared()


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_: Any) -> None:
    SHARED.close()


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    SHARED.close()


class VfioUser(User):
    abstract = True
    kind: ClassVar[str]
    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.client = SyncVfioClient.connect(DRIVER)
        self.flow: Flow = FLOWS[self.kind](
            self.kind,
            self.client,
            SHARED.pool(self.kind).scenario,
            SHARED.pool(self.kind),
            self._record,
            random.Random(),
        )

    def _record(
        self,
        kind: str,
        name: str,
        seconds: float,
        *,
        length: int = 0,
        error: BaseException | None = None,
    ) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=error,
            context={},
        )

    def on_start(self) -> None:
        self.flow.start()

    def on_stop(self) -> None:
        self.flow.stop()
        self.client.close_client()

    def step(self) -> None:
        """One step; a step that raised is a failure ("step"), and the flow
        starts again on the same devices (fds closed: back to RUNNING)."""
        try:
            self.flow.step()
        except Exception as e:  # every error is the load test's finding
            self._record(self.kind, "step", 0.0, error=e)
            self.flow.stop()
            self.flow.start()

    tasks = [step]


def _user_class(kind: str) -> type[VfioUser]:
    weight = MIX.get(kind, 1)
    return type(CLASS_NAMES[kind], (VfioUser,), {"kind": kind, "weight": weight})


ReinitLoopUser = _user_class("reinit-loop")
MigrationUser = _user_class("migration")
PrecopyHammerUser = _user_class("precopy-hammer")
FaultsUser = _user_class("faults")

"""The fwemu gRPC server: the Firmware and Scenario services over one model."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from grpcsvc.access import Roles
from grpcsvc.generic import GenericHandlersOnly
from grpcsvc.looplag import LoopLag
from grpcsvc.metrics import GrpcServerMetrics
from grpcsvc.server import GrpcService
from grpcsvc.tls import unix_path

from ..api.v1 import firmware_pb2, scenario_pb2
from ..api.v1 import firmware_pb2_grpc as fgrpc
from ..api.v1 import scenario_pb2_grpc as sgrpc
from ..model.firmware import Firmware
from .memory import DEFAULT_IDLE_S, DEFAULT_MAX_REMOTE_BYTES, MAX_MKEYS_PER_CLIENT, MkeyMemory
from .metrics import FirmwareCollector
from .servicers import FirmwareServicer, ScenarioServicer

FIRMWARE_SERVICE = firmware_pb2.DESCRIPTOR.services_by_name["Firmware"].full_name
SCENARIO_SERVICE = scenario_pb2.DESCRIPTOR.services_by_name["Scenario"].full_name


class FirmwareServer:
    """Serves a Firmware model; make it inside the running event loop."""

    def __init__(
        self,
        fw: Firmware,
        *,
        shm_dir: str | None = None,
        max_remote_bytes: int = DEFAULT_MAX_REMOTE_BYTES,
        metrics: CollectorRegistry | None = None,
        per_vf_limit: int = 0,
        max_mkeys_per_client: int = MAX_MKEYS_PER_CLIENT,
        client_idle: float = DEFAULT_IDLE_S,
        roles: Roles | None = None,
    ) -> None:
        """`metrics`: a registry to fill with the gRPC server metrics and the
        firmware's own (served at /metrics by whoever owns the registry).
        `max_mkeys_per_client`, `client_idle`: the mkeys a client may hold,
        and how long a client without a completion stream keeps them idle.
        `roles`: who may call what (fwemu.service.access; default: every
        caller without a client certificate may do anything, as before TLS)."""
        self.fw = fw
        self.roles = Roles() if roles is None else roles
        self.memory = MkeyMemory(
            fw,
            shm_dir=shm_dir,
            max_remote_bytes=max_remote_bytes,
            max_mkeys_per_client=max_mkeys_per_client,
            idle_s=client_idle,
        )

        self.firmware = FirmwareServicer(fw, self.memory, self.roles)

        def register(server: grpc.aio.Server) -> None:
            # Generic handlers only: grpc.aio costs each call O(registered methods).
            generic: Any = GenericHandlersOnly(server)
            fgrpc.add_FirmwareServicer_to_server(self.firmware, generic)
            sgrpc.add_ScenarioServicer_to_server(ScenarioServicer(fw, self.roles), generic)

        interceptors = []
        loop_lag = None
        if metrics is not None:
            metrics.register(FirmwareCollector(fw, per_vf_limit=per_vf_limit))
            interceptors.append(GrpcServerMetrics(metrics).interceptor)
            loop_lag = LoopLag(metrics)
        self.service = GrpcService(
            [FIRMWARE_SERVICE, SCENARIO_SERVICE],
            register,
            interceptors=interceptors,
            loop_lag=loop_lag,
        )

    async def start(self, listen: str, **options: Any) -> int:
        """Bind and start (`options`: GrpcService.start's TLS options).  On a
        unix socket (mode 0600 by default) the peers are this user or root, so
        a segment must be one of theirs; over TCP the peer's uid is unknown."""
        if unix_path(listen) is not None:
            self.memory.segment_uids = frozenset({os.geteuid(), 0})
        return await self.service.start(listen, **options)

    async def stop(self, grace: float = 1.0) -> None:
        self.firmware.stopping.set()  # completion streams end at once
        await self.service.stop(grace)
        self.memory.close()

    async def serve_until(self, stop: asyncio.Event, grace: float = 5.0) -> None:
        await self.service.serve_until(stop, grace, on_stop=self.firmware.stopping.set)
        self.memory.close()

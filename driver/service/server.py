"""The vfio-driver gRPC server over a device registry."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry

from grpcsvc.access import Roles
from grpcsvc.generic import GenericHandlersOnly
from grpcsvc.looplag import LoopLag
from grpcsvc.metrics import GrpcServerMetrics
from grpcsvc.server import GrpcService

from ..api.v1 import vfio_pb2
from ..api.v1 import vfio_pb2_grpc as pbg
from ..api.wire import decode_write_request, encode_read_response
from ..registry import DeviceRegistry
from .metrics import DriverCollector
from .process import CLIENT_IDLE
from .servicer import VfioServicer

if TYPE_CHECKING:
    from fwemu.embedded import EmbeddedFirmware

VFIO_SERVICE = vfio_pb2.DESCRIPTOR.services_by_name["Vfio"].full_name

log = logging.getLogger("vfio-driver")


class _Captured:
    """Stands in for the server while the generated code registers the Vfio
    handlers, so that they can be registered with Write's decoder replaced."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers come again, by name, below

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers.update(handlers)


def add_vfio_servicer(servicer: VfioServicer, server: grpc.aio.Server) -> None:
    """The generated registration, but Write's requests decoded and Read's
    and ReadStream's answers encoded by driver/api/wire.py (the data as a view
    of the received message; the answer's data copied once)."""
    captured = _Captured()
    pbg.add_VfioServicer_to_server(servicer, captured)  # type: ignore[arg-type]  # a stand-in
    handlers = dict(captured.handlers)
    handlers["Write"] = handlers["Write"]._replace(  # type: ignore[attr-defined]
        request_deserializer=decode_write_request
    )
    for name in ("Read", "ReadStream"):
        handlers[name] = handlers[name]._replace(  # type: ignore[attr-defined]
            response_serializer=encode_read_response
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(VFIO_SERVICE, handlers),))
    server.add_registered_method_handlers(VFIO_SERVICE, handlers)  # type: ignore[attr-defined]


class DriverServer:
    """Serves a DeviceRegistry; make it inside the running event loop.

    `firmware`: the embedded firmware (when the registry's link is its), whose
    metrics join the driver's.  With `scenario_service` its fwemu Scenario
    service (digests, reconfigurations, faults) is served on the same port, as
    `fwemu serve` serves it: what a test of an orchestrator needs from the
    firmware when there is no separate fwemu process.

    Health: the Vfio service is SERVING while every firmware link is up, and
    NOT_SERVING while any is down (a shard's devices cannot migrate then); the
    server as a whole ("") stays SERVING, since the process is well and a
    restart would not bring the firmware back.
    """

    def __init__(
        self,
        registry: DeviceRegistry,
        *,
        firmware: EmbeddedFirmware | None = None,
        scenario_service: bool = False,
        metrics: CollectorRegistry | None = None,
        per_device_limit: int = 0,
        shm_dir: str | None = None,
        client_idle: float = CLIENT_IDLE,
        roles: Roles | None = None,
    ) -> None:
        """`metrics`: a registry to fill with the gRPC server metrics and the
        driver's own, and the embedded `firmware`'s (served at /metrics by
        whoever owns the registry).  `shm_dir`: where clients' user memory
        segments are (MapUserMemory; default /dev/shm).  `client_idle`: how
        long a client with nothing open is remembered.  `roles`: who sees
        every device's events and audit, and (embedded) may use Scenario on
        any VF; without client certificates everyone does."""
        if scenario_service and firmware is None:
            raise ValueError("the Scenario service is an embedded firmware's")
        self.registry = registry
        self.roles = roles if roles is not None else Roles()
        self.servicer = VfioServicer(
            registry, shm_dir=shm_dir, client_idle=client_idle, roles=self.roles
        )
        scenario = firmware if scenario_service else None
        names = [VFIO_SERVICE]
        if scenario is not None:
            names.append(scenario.scenario_service)

        def register(server: grpc.aio.Server) -> None:
            # Generic handlers only: grpc.aio costs each call O(registered methods).
            generic: Any = GenericHandlersOnly(server)
            add_vfio_servicer(self.servicer, generic)
            if scenario is not None:
                scenario.add_scenario_servicer(generic, self.roles)

        interceptors = []
        loop_lag = None
        if metrics is not None:
            metrics.register(DriverCollector(self.servicer, per_device_limit=per_device_limit))
            if firmware is not None:
                metrics.register(firmware.collector())
            interceptors.append(GrpcServerMetrics(metrics).interceptor)
            loop_lag = LoopLag(metrics)
        self.service = GrpcService(names, register, interceptors=interceptors, loop_lag=loop_lag)
        self._health_lock = asyncio.Lock()
        self._health_tasks: set[asyncio.Task[None]] = set()
        for k, link in enumerate(registry.links):
            link.watch_state(functools.partial(self._link_state, k))

    def _link_state(self, shard: int, up: bool, why: str) -> None:
        if not up:
            where = f"shard {shard}" if len(self.registry.links) > 1 else "the firmware"
            log.warning("%s unreachable: %s; %s NOT_SERVING", where, why, VFIO_SERVICE)
        task = asyncio.get_running_loop().create_task(self._sync_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _sync_health(self) -> None:
        async with self._health_lock:  # in order: the last change wins
            if self.service.port:
                serving = all(link.up for link in self.registry.links)
                await self.service.set_serving(VFIO_SERVICE, serving)

    async def start(self, listen: str, **options: Any) -> int:
        """Bind and start (`options`: GrpcService.start's TLS options)."""
        await self.registry.refresh()
        port = await self.service.start(listen, **options)
        await self._sync_health()
        return port

    async def stop(self, grace: float = 1.0) -> None:
        """Session streams end at once (a client's lifetime is no call to wait
        for: waiting for them would always take the whole grace); other calls
        get `grace` seconds; then every client's fds are closed."""
        self.servicer.stopping.set()
        await self.service.stop(grace)
        await self._close_all()

    async def serve_until(self, stop: asyncio.Event, grace: float = 5.0) -> None:
        await self.service.serve_until(stop, grace, on_stop=self.servicer.stopping.set)
        await self._close_all()

    async def _close_all(self) -> None:
        """Every client's fds closed (the firmware told nobody holds its
        VFs), then no more telling: the links close next."""
        await self.servicer.close_all()
        await self.registry.holders.aclose()

"""Async helpers over the firmware's Scenario service.

The target is a `fwemu serve` address or a `vfio-driver serve --scenario-service`
address (the embedded firmware's Scenario service on the driver's port):

    async with await ScenarioClient.connect("127.0.0.1:50052") as s:
        vfs = await s.list_vfs()
        digest = await s.digest(vfs[0].vhca_id)
        await s.inject_fault(vfs[0].vhca_id, "fail", opcode="SAVE_VHCA_STATE")
        await s.reconfigure(vfs[0].vhca_id, [("QP", 4096)])
        await s.reconfigure(vfs[0].vhca_id, [("QP", 4096)], mode="replace")
        await s.configure_vf(vfs[0].vhca_id, reconfig_rate_per_s=5.0)
        await s.reset_vf(vfs[0].vhca_id)

Only the Scenario service is used (no completion stream, which a driver port
does not serve).  Failures raise `ScenarioClientError`; an unreachable
service raises it with errno ECONNREFUSED, a server without the Scenario
service (a driver without --scenario-service) with EOPNOTSUPP.  TLS as VfioClient's: `tls=`, by
default the VFIO_TLS_* environment variables if they are set.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypedDict, TypeVar, Unpack

import grpc

from fwemu.api.v1 import scenario_pb2
from fwemu.link.base import LinkError
from fwemu.link.cmdqueue import RpcFailed
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import (
    CmdStatus,
    Fault,
    FaultKind,
    Opcode,
    ReconfigMode,
    Syndrome,
)
from fwemu.link.scenario_requests import reconfig_mode

from .client import AsyncClosing
from .transport import FROM_ENV, TlsChoice, resolve_tls

__all__ = [
    "FAULT_KINDS",
    "RECONFIG_MODES",
    "ScenarioClient",
    "ScenarioClientError",
    "make_fault",
]

FAULT_KINDS = [k.name.lower().replace("_", "-") for k in FaultKind]
RECONFIG_MODES = [m.name.lower() for m in ReconfigMode]

SCENARIO_SERVICE = scenario_pb2.DESCRIPTOR.services_by_name["Scenario"].full_name

P = ParamSpec("P")
T = TypeVar("T")


class ScenarioClientError(OSError):
    """A failed Scenario call: errno EIO, ECONNREFUSED for an unreachable
    service, EOPNOTSUPP for a gRPC server without the Scenario service."""


def _unimplemented(e: BaseException) -> bool:
    """The server answered, without a Scenario service (UNIMPLEMENTED)."""
    return isinstance(e, RpcFailed) and e.code == grpc.StatusCode.UNIMPLEMENTED


def not_served(target: str) -> str:
    return (
        f"the service at {target} does not serve the firmware's Scenario service "
        f"({SCENARIO_SERVICE}), which `fwemu serve` and `vfio-driver serve "
        "--scenario-service` serve"
    )


def _enum(cls: Any, value: int | str, what: str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip()
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return int(cls[text.upper().replace("-", "_")])
    except KeyError:
        names = ", ".join(m.name for m in cls)
        raise ValueError(f"unknown {what} {value!r} (one of {names}, or a number)") from None


class FaultArgs(TypedDict, total=False):
    """What a fault hits and how, besides its kind (defaults: make_fault's)."""

    opcode: int | str
    status: int | str
    syndrome: int | str
    delay_s: float
    count: int
    in_completion: bool


def make_fault(kind: FaultKind | str, **args: Unpack[FaultArgs]) -> Fault:
    """A Fault from friendly arguments: names ("fail", "SAVE_VHCA_STATE", "INT_ERR")
    or numbers; validated (ValueError).  By default a fault hits SAVE_VHCA_STATE
    once with INT_ERR / INJECTED."""
    k = FaultKind(_enum(FaultKind, kind, "fault kind") if isinstance(kind, str) else kind)
    f = Fault(
        k,
        opcode=_enum(Opcode, args.get("opcode", Opcode.SAVE_VHCA_STATE), "opcode"),
        status=_enum(CmdStatus, args.get("status", CmdStatus.INT_ERR), "status"),
        syndrome=_enum(Syndrome, args.get("syndrome", Syndrome.INJECTED), "syndrome"),
        delay_s=args.get("delay_s", 0.0),
        count=args.get("count", 1),
        in_completion=args.get("in_completion", False),
    )
    f.validate()
    return f


def _scenario_call(
    method: Callable[Concatenate[GrpcLink, P], Awaitable[T]], doc: str | None = None
) -> Callable[Concatenate[ScenarioClient, P], Awaitable[T]]:
    """`method` of the client's link, its LinkErrors raised as ScenarioClientError."""

    async def call(self: ScenarioClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(self.link, *args, **kwargs)
        except LinkError as e:
            if _unimplemented(e):
                raise ScenarioClientError(errno.EOPNOTSUPP, not_served(self.target)) from None
            raise ScenarioClientError(errno.EIO, str(e)) from None

    call.__name__ = method.__name__
    call.__doc__ = doc
    return call


class ScenarioClient(AsyncClosing):
    """A client of one firmware's Scenario service."""

    def __init__(self, link: GrpcLink) -> None:
        self.link = link
        self.target = link.target

    @classmethod
    async def connect(
        cls, target: str, *, timeout: float = 10.0, tls: TlsChoice = FROM_ENV
    ) -> ScenarioClient:
        """Connect and check the service answers (ListVfs) within `timeout`."""
        link = GrpcLink(target, tls=resolve_tls(tls))
        c = cls(link)
        try:
            await asyncio.wait_for(link.list_vfs(), timeout)
        except (LinkError, TimeoutError) as e:
            await c.aclose()
            if _unimplemented(e):
                raise ScenarioClientError(errno.EOPNOTSUPP, not_served(target)) from None
            why = str(e) or "timed out"
            raise ScenarioClientError(
                errno.ECONNREFUSED, f"cannot reach the Scenario service at {target}: {why}"
            ) from None
        return c

    async def aclose(self) -> None:
        await self.link.close()

    # --- VFs -------------------------------------------------------------------------

    list_vfs = _scenario_call(GrpcLink.list_vfs)
    create_vfs = _scenario_call(GrpcLink.create_vfs)
    get_vf = _scenario_call(GrpcLink.get_vf, "A snapshot of the VF (VfInfo).")
    configure_vf = _scenario_call(
        GrpcLink.configure_vf,
        """Change VfConfig fields (not size) of a live VF, e.g.
        reconfig_rate_per_s=5.0, reconfig_mode=ReconfigMode.REPLACE: its VfInfo.""",
    )
    remove_vf = _scenario_call(GrpcLink.remove_vf)
    reset_vf = _scenario_call(
        GrpcLink.reset_vf,
        """Put the VF back to the state it was created in (its config and seed):
        objects, contents, workload and automatic reconfigurations as new,
        scheduled reconfigurations and faults dropped, migration context ended
        as by an FLR (a SAVE in flight completes ABORTED): its VfInfo.""",
    )
    digest = _scenario_call(
        GrpcLink.digest,
        """The VF's state digest (stable while the VF is suspended); with
        suspended=True, the digest of the state it had while it was last
        suspended ("" if it never was): a migration's source as its stop-copy
        saw it, whenever it is asked.""",
    )

    # --- events ----------------------------------------------------------------------

    _reconfigure = _scenario_call(GrpcLink.reconfigure)
    _inject_fault = _scenario_call(GrpcLink.inject_fault)

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
        mode: ReconfigMode | int | str = ReconfigMode.ADD,
    ) -> int:
        """Reconfigure the VF (now, at a firmware time, or after N saved bytes):
        the trigger id.  `objects`: (type, size) pairs, e.g. [("QP", 4096)]
        (none: one QP of the VF's reconfig_bytes).  `mode`: "add" appends them,
        "replace" puts them in the place of the oldest objects (the state does
        not grow), "remove" removes the oldest objects, at least the objects'
        total size (ValueError for another mode)."""
        return await self._reconfigure(
            vhca_id,
            objects,
            at_time=at_time,
            after_saved_bytes=after_saved_bytes,
            mode=reconfig_mode(mode),
        )

    clear_faults = _scenario_call(GrpcLink.clear_faults)

    async def inject_fault(
        self, vhca_id: int, kind: FaultKind | str | Fault, **args: Unpack[FaultArgs]
    ) -> int:
        """Arm a fault on the VF: the fault id.  `kind`: fail, delay,
        drop-completion, delay-completion, tracking-lost (or a Fault)."""
        fault = kind if isinstance(kind, Fault) else make_fault(kind, **args)
        return await self._inject_fault(vhca_id, fault)

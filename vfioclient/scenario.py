"""Async helpers over the firmware's Scenario service.

The target is a `fwemu serve` address or a `vfio-driver serve --scenario-service`
address (the embedded firmware's Scenario service on the driver's port):

    async with await ScenarioClient.connect("127.0.0.1:50052") as s:
        vfs = await s.list_vfs()
        digest = await s.digest(vfs[0].vhca_id)
        await s.inject_fault(vfs[0].vhca_id, "fail", opcode="SAVE_VHCA_STATE")
        await s.reconfigure(vfs[0].vhca_id, [("QP", 4096)])

Only the Scenario service is used (no completion stream, which a driver port
does not serve).  Failures raise `ScenarioClientError`; an unreachable
service raises it with errno ECONNREFUSED.
"""

from __future__ import annotations

import errno
from types import TracebackType
from typing import Any

from fwemu.link.base import LinkError
from fwemu.link.grpc import GrpcLink
from fwemu.link.ifc import CmdStatus, Fault, FaultKind, Opcode, Syndrome, VfConfig, VfInfo

__all__ = ["FAULT_KINDS", "ScenarioClient", "ScenarioClientError", "make_fault"]

FAULT_KINDS = [k.name.lower().replace("_", "-") for k in FaultKind]


class ScenarioClientError(OSError):
    """A failed Scenario call (errno EIO unless the service is unreachable)."""


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


def make_fault(
    kind: FaultKind | str,
    *,
    opcode: int | str = Opcode.SAVE_VHCA_STATE,
    status: int | str = CmdStatus.INT_ERR,
    syndrome: int | str = Syndrome.INJECTED,
    delay_s: float = 0.0,
    count: int = 1,
    in_completion: bool = False,
) -> Fault:
    """A Fault from friendly arguments: names ("fail", "SAVE_VHCA_STATE", "INT_ERR")
    or numbers; validated (ValueError)."""
    k = FaultKind(_enum(FaultKind, kind, "fault kind") if isinstance(kind, str) else kind)
    f = Fault(
        k,
        opcode=_enum(Opcode, opcode, "opcode"),
        status=_enum(CmdStatus, status, "status"),
        syndrome=_enum(Syndrome, syndrome, "syndrome"),
        delay_s=delay_s,
        count=count,
        in_completion=in_completion,
    )
    f.validate()
    return f


class ScenarioClient:
    """A client of one firmware's Scenario service."""

    def __init__(self, link: GrpcLink) -> None:
        self.link = link
        self.target = link.target

    @classmethod
    async def connect(cls, target: str, *, timeout: float = 10.0) -> ScenarioClient:
        """Connect and check the service answers (ListVfs) within `timeout`."""
        import asyncio

        link = GrpcLink(target)
        c = cls(link)
        try:
            await asyncio.wait_for(link.list_vfs(), timeout)
        except (LinkError, TimeoutError) as e:
            await c.aclose()
            why = str(e) or "timed out"
            raise ScenarioClientError(
                errno.ECONNREFUSED, f"cannot reach the Scenario service at {target}: {why}"
            ) from None
        return c

    async def aclose(self) -> None:
        await self.link.close()

    async def __aenter__(self) -> ScenarioClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _wrap(self, coro: Any) -> Any:
        try:
            return await coro
        except LinkError as e:
            raise ScenarioClientError(errno.EIO, str(e)) from None

    # --- VFs -------------------------------------------------------------------------

    async def list_vfs(self) -> list[VfInfo]:
        vfs: list[VfInfo] = await self._wrap(self.link.list_vfs())
        return vfs

    async def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[VfInfo]:
        vfs: list[VfInfo] = await self._wrap(self.link.create_vfs(count, config))
        return vfs

    async def digest(self, vhca_id: int) -> str:
        """The VF's state digest (stable while the VF is suspended)."""
        d: str = await self._wrap(self.link.digest(vhca_id))
        return d

    # --- events ----------------------------------------------------------------------

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int:
        """Reconfigure the VF (now, at a firmware time, or after N saved bytes):
        the trigger id.  `objects`: (type, size) pairs, e.g. [("QP", 4096)]."""
        t: int = await self._wrap(
            self.link.reconfigure(
                vhca_id, objects, at_time=at_time, after_saved_bytes=after_saved_bytes
            )
        )
        return t

    async def inject_fault(
        self,
        vhca_id: int,
        kind: FaultKind | str | Fault,
        *,
        opcode: int | str = Opcode.SAVE_VHCA_STATE,
        status: int | str = CmdStatus.INT_ERR,
        syndrome: int | str = Syndrome.INJECTED,
        delay_s: float = 0.0,
        count: int = 1,
        in_completion: bool = False,
    ) -> int:
        """Arm a fault on the VF: the fault id.  `kind`: fail, delay,
        drop-completion, delay-completion, tracking-lost (or a Fault)."""
        fault = (
            kind
            if isinstance(kind, Fault)
            else make_fault(
                kind,
                opcode=opcode,
                status=status,
                syndrome=syndrome,
                delay_s=delay_s,
                count=count,
                in_completion=in_completion,
            )
        )
        fid: int = await self._wrap(self.link.inject_fault(vhca_id, fault))
        return fid

    async def clear_faults(self, vhca_id: int) -> int:
        n: int = await self._wrap(self.link.clear_faults(vhca_id))
        return n

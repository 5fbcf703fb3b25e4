"""The fwemu behaviour tests' harness: a firmware link in one of its modes
(in-process, gRPC, gRPC with firmware-held memory) and short names for what the
tests do through it (tests/fwemu/conftest.py makes them fixtures).  Over gRPC
the server and the link are in the run's mode (tests/support/tls_mode.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fwemu.link.ifc import (
    CmdResult,
    KiB,
    QueryResult,
    ResumeOpMod,
    SaveAccepted,
    SaveCompletion,
    SuspendOpMod,
    VfConfig,
)
from fwemu.link.inproc import InProcessLink
from fwemu.model import Firmware

# How long a test waits for something the firmware must deliver (real seconds).
DELIVERY_TIMEOUT_S = 5.0


async def open_link(fw: Firmware, mode: str, closers: list[Callable[[], Awaitable[None]]]) -> Any:
    """A link to `fw`: "inproc", "grpc" (host memory shared) or "grpc-remote"
    (the firmware holds host memory, so the DMA syncs move the bytes).  What
    must be closed, in reverse order, is appended to `closers`."""
    link: Any
    if mode == "inproc":
        link = InProcessLink(fw)
    else:
        # Imported here so that the in-process tests collect without gRPC code;
        # a missing module must fail the grpc tests, never skip them.
        from fwemu.service.server import FirmwareServer
        from tests.support import harness_link, tls_mode

        server = FirmwareServer(fw, roles=tls_mode.roles())
        target = await tls_mode.start(server)

        async def stop() -> None:
            tls_mode.stopped(target)
            await server.stop()

        closers.append(stop)
        memory = "remote" if mode == "grpc-remote" else "auto"
        link = await harness_link.connect_link(target, memory=memory)
    closers.append(link.close)
    return link


@dataclass(eq=False)
class PendingSave:
    """An issued SAVE_VHCA_STATE: what the command answered and its completion."""

    accepted: SaveAccepted
    buf: Any  # HostBuffer
    va: int
    future: asyncio.Future[SaveCompletion]
    # Every completion the callback received (a SAVE completes at most once).
    completions: list[SaveCompletion] = field(default_factory=list)


class Harness:
    """Short names for what the tests do through a link (FirmwareLink + ScenarioLink)."""

    def __init__(self, link: Any, mode: str) -> None:
        self.link = link
        self.mode = mode
        self.fw: Firmware | None = None
        self._helper_vf: int | None = None

    # --- scenario side -----------------------------------------------------

    async def vf(self, config: VfConfig | None = None, **fields: Any) -> int:
        """Create one VF (VfConfig fields as keywords) and return its vhca_id."""
        [info] = await self.link.create_vfs(1, config or VfConfig(**fields))
        return int(info.vhca_id)

    async def vfs(self, count: int, **fields: Any) -> list[int]:
        infos = await self.link.create_vfs(count, VfConfig(**fields))
        return [int(i.vhca_id) for i in infos]

    async def advance(self, seconds: float) -> float:
        return float(await self.link.advance_clock(seconds))

    async def digest(self, vhca_id: int) -> str:
        return str(await self.link.digest(vhca_id))

    async def info(self, vhca_id: int) -> Any:
        return await self.link.get_vf(vhca_id)

    # --- commands -----------------------------------------------------------

    async def query(self, vhca_id: int, **kw: Any) -> QueryResult:
        res: QueryResult = await self.link.query_vhca_migration_state(vhca_id, **kw)
        return res

    async def mig_state(self, vhca_id: int) -> int:
        q = await self.query(vhca_id)
        assert q.ok, q
        return int(q.migration_state)

    async def suspend(self, vhca_id: int, op_mod: int) -> CmdResult:
        res: CmdResult = await self.link.suspend_vhca(vhca_id, op_mod=op_mod)
        return res

    async def resume(self, vhca_id: int, op_mod: int) -> CmdResult:
        res: CmdResult = await self.link.resume_vhca(vhca_id, op_mod=op_mod)
        return res

    async def suspend_fully(self, vhca_id: int) -> None:
        """RUNNING -> RUNNING_P2P -> STOP as mlx5vf does it (initiator, then responder)."""
        for op_mod in (SuspendOpMod.SUSPEND_INITIATOR, SuspendOpMod.SUSPEND_RESPONDER):
            res = await self.suspend(vhca_id, op_mod)
            assert res.ok, res

    async def resume_fully(self, vhca_id: int) -> None:
        for op_mod in (ResumeOpMod.RESUME_RESPONDER, ResumeOpMod.RESUME_INITIATOR):
            res = await self.resume(vhca_id, op_mod)
            assert res.ok, res

    async def buffer(self, length: int) -> Any:
        return await self.link.alloc_buffer(length)

    async def save(
        self,
        vhca_id: int,
        size: int,
        *,
        incremental: bool = False,
        set_track: bool = False,
        buf: Any = None,
        mkey: int | None = None,
        va: int = 0,
        op_mod: int = 0,
    ) -> PendingSave:
        """Issue a SAVE into `buf` (default: a fresh buffer of va + size bytes)."""
        if buf is None and mkey is None and va + size > 0:
            buf = await self.buffer(va + size)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SaveCompletion] = loop.create_future()
        pending: PendingSave

        def resolve(c: SaveCompletion) -> None:
            pending.completions.append(c)
            if not fut.done():
                fut.set_result(c)

        def callback(c: SaveCompletion) -> None:
            # The link may call back from another thread: resolve in the loop.
            loop.call_soon_threadsafe(resolve, c)

        accepted = await self.link.save_vhca_state(
            vhca_id,
            mkey=mkey if mkey is not None else (buf.mkey if buf is not None else 0),
            size=size,
            incremental=incremental,
            set_track=set_track,
            va=va,
            op_mod=op_mod,
            callback=callback,
        )
        pending = PendingSave(accepted, buf, va, fut)
        return pending

    @staticmethod
    async def completion(pending: PendingSave) -> SaveCompletion:
        """The SAVE's completion, however it travels (resolved by the callback)."""
        return await asyncio.wait_for(asyncio.shield(pending.future), DELIVERY_TIMEOUT_S)

    async def image(self, pending: PendingSave, c: SaveCompletion) -> bytes:
        """The bytes a completed SAVE wrote (synced for the CPU first)."""
        n = c.actual_image_size
        if n == 0:
            return b""
        await self.link.dma_sync_for_cpu(pending.buf, pending.va, n)
        return bytes(pending.buf.view[pending.va : pending.va + n])

    async def save_done(self, vhca_id: int, size: int, **kw: Any) -> tuple[SaveCompletion, bytes]:
        """SAVE with zero latency: issue, let the clock run its completion, read the image."""
        pending = await self.save(vhca_id, size, **kw)
        assert pending.accepted.ok, pending.accepted
        await self.advance(0)
        c = await self.completion(pending)
        return c, await self.image(pending, c)

    async def save_ok(self, vhca_id: int, size: int, **kw: Any) -> bytes:
        c, img = await self.save_done(vhca_id, size, **kw)
        assert c.status == 0, c
        return img

    async def load(
        self, vhca_id: int, data: bytes, *, size: int | None = None, va: int = 0
    ) -> CmdResult:
        """LOAD `data` from a fresh buffer (synced for the device first)."""
        buf = await self.buffer(va + len(data))
        buf.view[va : va + len(data)] = data
        await self.link.dma_sync_for_device(buf, va, len(data))
        res: CmdResult = await self.link.load_vhca_state(
            vhca_id, mkey=buf.mkey, size=len(data) if size is None else size, va=va
        )
        await self.link.free_buffer(buf)
        return res

    async def barrier(self) -> None:
        """Wait until every completion due by now has been delivered.

        Completions travel in the order they complete; this issues a zero-latency
        SAVE on a helper VF and waits for its completion, so whatever completed
        before it has been delivered too.  Used to show that a completion did
        NOT arrive, in both modes.
        """
        if self._helper_vf is None:
            self._helper_vf = await self.vf(size=4 * KiB, dirty_bytes_per_s=0)
        # Pre-copy cleanup on a running VF: size 0 and mkey 0, writes nothing.
        pending = await self.save(self._helper_vf, 0, mkey=0)
        assert pending.accepted.ok, pending.accepted
        await self.advance(0)
        await self.completion(pending)

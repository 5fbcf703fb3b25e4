"""The firmware link to a `fwemu serve` process over gRPC.

SAVE completions arrive on one long-lived Completions stream and are handed to
the callback registered for their token (tokens are chosen here, in a space of
this client's own, so a completion can never race its own command's answer).
If the stream breaks, every SAVE still waiting completes with INT_ERR/ABORTED
so that no caller waits forever.

Host memory: on one host, buffers are shared memory segments the firmware maps
(`memory="shm"`); across hosts the firmware holds the memory and the DMA syncs
move the bytes (`memory="remote"`).  `memory="auto"` tries shared memory first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import grpc

from grpcsvc.errors import error_info
from grpcsvc.server import CHANNEL_OPTIONS

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import firmware_pb2_grpc as fgrpc
from ..api.v1 import scenario_pb2_grpc as sgrpc
from ..hostmem import HostMemoryError, Segment, create_segment, unlink_segment
from .base import ByteBuffer, FirmwareLink, LinkError, ScenarioLink
from .ifc import Command, MiB, R, SaveCompletion, VfInfo
from .scenario_requests import A, ListVfsIn, ScenarioRequest
from .wire import (
    CLIENT_KEY,
    RPCS,
    SCENARIO_RPCS,
    command_to_pb,
    from_pb,
    request_to_pb,
    result_from_pb,
)

T = TypeVar("T")
MemoryMode = Literal["auto", "shm", "remote"]
DMA_CHUNK = 1 * MiB


@dataclass(eq=False)
class ShmBuffer:
    mkey: int
    segment: Segment = field(repr=False)

    @property
    def length(self) -> int:
        return len(self.segment.view)

    @property
    def view(self) -> memoryview:
        return self.segment.view


class GrpcLink(FirmwareLink, ScenarioLink):
    """FirmwareLink and ScenarioLink over a gRPC channel."""

    def __init__(
        self,
        target: str,
        *,
        memory: MemoryMode = "auto",
        shm_dir: str | None = None,
        client_id: str | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        """`interceptors`: for the channel (the driver's gRPC client metrics)."""
        super().__init__()
        self.target = target
        self.memory = memory
        self.shm_dir = shm_dir
        self.client_id = client_id or f"link-{secrets.token_hex(8)}"
        self._metadata = ((CLIENT_KEY, self.client_id),)
        self.channel = grpc.aio.insecure_channel(
            target, options=CHANNEL_OPTIONS, interceptors=list(interceptors) or None
        )
        self.fw = fgrpc.FirmwareStub(self.channel)
        self.scenario = sgrpc.ScenarioStub(self.channel)
        self._token_base = secrets.randbits(31) << 32
        self._tokens = itertools.count(1)
        self._buffers: dict[int, ShmBuffer | ByteBuffer] = {}
        self._stream_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def connect(
        cls,
        target: str,
        *,
        memory: MemoryMode = "auto",
        shm_dir: str | None = None,
        timeout: float = 10.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> GrpcLink:
        """Connect and subscribe to completions; fails if the firmware does not answer."""
        link = cls(target, memory=memory, shm_dir=shm_dir, interceptors=interceptors)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link._stream_task = asyncio.create_task(link._completions(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except (TimeoutError, LinkError) as e:
            await link.close()
            raise LinkError(f"cannot reach the firmware at {target}: {e}") from None
        return link

    # --- completions -----------------------------------------------------------

    async def _completions(self, ready: asyncio.Future[None]) -> None:
        why = "completion stream ended"
        try:
            stream = self.fw.Completions(fpb.CompletionsRequest(), metadata=self._metadata)
            async for msg in stream:
                if msg.token == 0:
                    if not ready.done():
                        ready.set_result(None)
                    continue
                self._complete(from_pb(SaveCompletion, msg))
        except grpc.aio.AioRpcError as e:
            why = f"firmware connection lost: {e.code().name} {e.details()}"
            if not ready.done():
                ready.set_exception(LinkError(why))
        except asyncio.CancelledError:
            why = "link closed"
            raise
        finally:
            if not ready.done():
                ready.set_exception(LinkError(why))
            self._abort_waiting(why, asyncio.get_event_loop().time())

    # --- calls -------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await fn(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            raise LinkError(info.message or f"{e.code().name}: {e.details()}") from None

    # --- FirmwareLink --------------------------------------------------------------

    async def exec(self, cmd: Command[R]) -> R:
        m = await self._call(getattr(self.fw, RPCS[type(cmd)].name), command_to_pb(cmd))
        return result_from_pb(cmd, m)

    def _save_token(self) -> int:
        # This client's own token space: a completion never races its command's answer.
        return self._token_base | next(self._tokens)

    async def alloc_buffer(self, length: int) -> ShmBuffer | ByteBuffer:
        if length <= 0:
            raise ValueError("buffer length must be positive")
        buf: ShmBuffer | ByteBuffer
        if self.memory in ("auto", "shm"):
            try:
                buf = await self._alloc_shm(length)
                self._buffers[buf.mkey] = buf
                return buf
            except LinkError:
                if self.memory == "shm":
                    raise
                self.memory = "remote"  # the firmware cannot see our memory: another host
        m = await self._call(self.fw.CreateMkey, fpb.CreateMkeyRequest(length=length, remote=True))
        if m.status:
            raise LinkError(f"CREATE_MKEY failed: status {m.status:#x}: {m.diagnostic}")
        buf = ByteBuffer(m.mkey, bytearray(length))
        self._buffers[buf.mkey] = buf
        return buf

    async def _alloc_shm(self, length: int) -> ShmBuffer:
        try:
            seg = create_segment(length, self.shm_dir)
        except HostMemoryError as e:
            raise LinkError(str(e)) from None
        try:
            m = await self._call(
                self.fw.CreateMkey, fpb.CreateMkeyRequest(length=length, shm_name=seg.name)
            )
        finally:
            unlink_segment(seg.name, self.shm_dir)
        if m.status:
            seg.close()
            raise LinkError(f"CREATE_MKEY failed: status {m.status:#x}: {m.diagnostic}")
        return ShmBuffer(m.mkey, seg)

    async def free_buffer(self, buf: Any) -> None:
        self._buffers.pop(buf.mkey, None)
        with contextlib.suppress(LinkError):
            await self._call(self.fw.DestroyMkey, fpb.DestroyMkeyRequest(mkey=buf.mkey))
        if isinstance(buf, ShmBuffer):
            buf.segment.close()

    async def dma_sync_for_cpu(self, buf: Any, offset: int, length: int) -> None:
        if not isinstance(buf, ByteBuffer) or length <= 0:
            return
        dest = buf.view
        try:
            stream = self.fw.ReadMkey(
                fpb.ReadMkeyRequest(
                    mkey=buf.mkey, offset=offset, length=length, chunk_size=DMA_CHUNK
                ),
                metadata=self._metadata,
            )
            async for msg in stream:
                dest[msg.offset : msg.offset + len(msg.data)] = msg.data
        except grpc.aio.AioRpcError as e:
            raise LinkError(f"DMA from the firmware failed: {error_info(e).message}") from None

    async def dma_sync_for_device(self, buf: Any, offset: int, length: int) -> None:
        if not isinstance(buf, ByteBuffer) or length <= 0:
            return
        src = buf.view

        async def chunks() -> AsyncIterator[fpb.MkeyData]:
            for pos in range(offset, offset + length, DMA_CHUNK):
                end = min(pos + DMA_CHUNK, offset + length)
                yield fpb.MkeyData(mkey=buf.mkey, offset=pos, data=bytes(src[pos:end]))

        m = await self._call(self.fw.WriteMkey, chunks())
        if m.status:
            raise LinkError(f"DMA to the firmware failed: {m.diagnostic}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkError):
                await self._stream_task
        for buf in list(self._buffers.values()):
            if isinstance(buf, ShmBuffer):
                buf.segment.close()
        self._buffers.clear()
        await self.channel.close(None)

    # --- ScenarioLink --------------------------------------------------------------

    async def control(self, req: ScenarioRequest[A]) -> A:
        rpc = SCENARIO_RPCS[type(req)]
        m = await self._call(getattr(self.scenario, rpc.name), request_to_pb(req))
        return cast(A, rpc.answer(m))

    async def list_vfs(self) -> list[VfInfo]:
        return await self.control(ListVfsIn())

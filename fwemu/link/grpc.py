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
from typing import Any, Literal, TypeVar

import grpc

from grpcsvc.errors import error_info
from grpcsvc.server import CHANNEL_OPTIONS

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import firmware_pb2_grpc as fgrpc
from ..api.v1 import scenario_pb2 as spb
from ..api.v1 import scenario_pb2_grpc as sgrpc
from ..hostmem import HostMemoryError, Segment, create_segment, unlink_segment
from ..service import convert
from ..service.servicers import CLIENT_KEY
from .base import ByteBuffer, CompletionCallback, LinkError
from .ifc import (
    CmdResult,
    CmdStatus,
    Fault,
    HcaCapResult,
    MiB,
    PageTrackResult,
    QueryResult,
    SaveAccepted,
    SaveCompletion,
    Syndrome,
    VfConfig,
    VfInfo,
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


class GrpcLink:
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
        self._callbacks: dict[int, tuple[int, CompletionCallback]] = {}
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
                entry = self._callbacks.get(msg.token)
                if entry is not None and entry[0] == msg.vhca_id:
                    del self._callbacks[msg.token]
                    entry[1](convert.completion_from_pb(msg))
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
            self._abort_pending(why)

    def _abort_pending(self, why: str) -> None:
        pending, self._callbacks = self._callbacks, {}
        loop = asyncio.get_event_loop()
        for token, (vhca_id, cb) in pending.items():
            c = SaveCompletion(
                token, vhca_id, CmdStatus.INT_ERR, Syndrome.ABORTED, 0, 0, loop.time(), why
            )
            cb(c)

    # --- calls -------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await fn(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            raise LinkError(info.message or f"{e.code().name}: {e.details()}") from None

    # --- FirmwareLink --------------------------------------------------------------

    async def query_hca_cap(
        self, *, op_mod: int, other_function: bool = True, function_id: int = 0
    ) -> HcaCapResult:
        m = await self._call(
            self.fw.QueryHcaCap,
            fpb.QueryHcaCapRequest(
                op_mod=op_mod, other_function=other_function, function_id=function_id
            ),
        )
        return convert.hca_cap_from_pb(m, op_mod)

    async def query_vhca_migration_state(
        self, vhca_id: int, *, op_mod: int = 0, incremental: bool = False, chunk: bool = False
    ) -> QueryResult:
        m = await self._call(
            self.fw.QueryVhcaMigrationState,
            fpb.QueryVhcaMigrationStateRequest(
                vhca_id=vhca_id, op_mod=op_mod, incremental=incremental, chunk=chunk
            ),
        )
        return convert.query_from_pb(m)

    async def save_vhca_state(
        self,
        vhca_id: int,
        *,
        mkey: int,
        size: int,
        incremental: bool = False,
        set_track: bool = False,
        va: int = 0,
        op_mod: int = 0,
        callback: CompletionCallback,
    ) -> SaveAccepted:
        token = self._token_base | next(self._tokens)
        self._callbacks[token] = (vhca_id, callback)
        try:
            m = await self._call(
                self.fw.SaveVhcaState,
                fpb.SaveVhcaStateRequest(
                    vhca_id=vhca_id,
                    op_mod=op_mod,
                    incremental=incremental,
                    set_track=set_track,
                    va=va,
                    mkey=mkey,
                    size=size,
                    token=token,
                ),
            )
        except BaseException:
            self._callbacks.pop(token, None)
            raise
        res = convert.save_from_pb(m)
        if not res.ok:
            self._callbacks.pop(token, None)
        return res

    async def load_vhca_state(
        self, vhca_id: int, *, mkey: int, size: int, va: int = 0, op_mod: int = 0
    ) -> CmdResult:
        m = await self._call(
            self.fw.LoadVhcaState,
            fpb.LoadVhcaStateRequest(vhca_id=vhca_id, op_mod=op_mod, va=va, mkey=mkey, size=size),
        )
        return convert.cmd_from_pb(m)

    async def suspend_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult:
        m = await self._call(
            self.fw.SuspendVhca, fpb.SuspendVhcaRequest(vhca_id=vhca_id, op_mod=op_mod)
        )
        return convert.cmd_from_pb(m)

    async def resume_vhca(self, vhca_id: int, *, op_mod: int) -> CmdResult:
        m = await self._call(
            self.fw.ResumeVhca, fpb.ResumeVhcaRequest(vhca_id=vhca_id, op_mod=op_mod)
        )
        return convert.cmd_from_pb(m)

    async def function_level_reset(self, vhca_id: int) -> CmdResult:
        m = await self._call(
            self.fw.FunctionLevelReset, fpb.FunctionLevelResetRequest(vhca_id=vhca_id)
        )
        return convert.cmd_from_pb(m)

    async def create_page_tracker(
        self, vhca_id: int, ranges: list[tuple[int, int]], log_page_size: int
    ) -> PageTrackResult:
        m = await self._call(
            self.fw.CreatePageTracker,
            fpb.CreatePageTrackerRequest(
                vhca_id=vhca_id,
                log_page_size=log_page_size,
                ranges=[fpb.PageTrackRange(start_address=a, length=n) for a, n in ranges],
            ),
        )
        return convert.page_track_from_pb(m)

    async def report_page_tracker(
        self, vhca_id: int, obj_id: int, iova: int, length: int
    ) -> PageTrackResult:
        m = await self._call(
            self.fw.ReportPageTracker,
            fpb.ReportPageTrackerRequest(
                vhca_id=vhca_id, obj_id=obj_id, range_start_address=iova, length=length
            ),
        )
        return convert.page_track_from_pb(m)

    async def destroy_page_tracker(self, vhca_id: int, obj_id: int) -> CmdResult:
        m = await self._call(
            self.fw.DestroyPageTracker,
            fpb.DestroyPageTrackerRequest(vhca_id=vhca_id, obj_id=obj_id),
        )
        return convert.cmd_from_pb(m)

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

    async def create_vfs(self, count: int = 1, config: VfConfig | None = None) -> list[VfInfo]:
        req = spb.CreateVfsRequest(count=count)
        if config is not None:
            req.config.CopyFrom(convert.config_to_pb(config))
        m = await self._call(self.scenario.CreateVfs, req)
        return [convert.vf_info_from_pb(v) for v in m.vfs]

    async def remove_vf(self, vhca_id: int) -> None:
        await self._call(self.scenario.RemoveVf, spb.RemoveVfRequest(vhca_id=vhca_id))

    async def configure_vf(self, vhca_id: int, **changes: Any) -> VfInfo:
        caps = changes.pop("caps", None)
        cfg = spb.VfConfig(**changes)
        if caps is not None:
            cfg.caps.CopyFrom(convert.caps_to_pb(caps))
        m = await self._call(
            self.scenario.ConfigureVf, spb.ConfigureVfRequest(vhca_id=vhca_id, config=cfg)
        )
        return convert.vf_info_from_pb(m)

    async def get_vf(self, vhca_id: int) -> VfInfo:
        m = await self._call(self.scenario.GetVf, spb.GetVfRequest(vhca_id=vhca_id))
        return convert.vf_info_from_pb(m)

    async def list_vfs(self) -> list[VfInfo]:
        m = await self._call(self.scenario.ListVfs, spb.ListVfsRequest())
        return [convert.vf_info_from_pb(v) for v in m.vfs]

    async def reconfigure(
        self,
        vhca_id: int,
        objects: list[tuple[str, int]] | None = None,
        *,
        at_time: float | None = None,
        after_saved_bytes: int | None = None,
    ) -> int:
        if at_time is not None and after_saved_bytes is not None:
            raise LinkError("give a time or a byte count, not both")
        req = spb.ReconfigureRequest(
            vhca_id=vhca_id, objects=[spb.ObjectSpec(type=t, size=s) for t, s in objects or []]
        )
        if at_time is not None:
            req.at_time = at_time
        elif after_saved_bytes is not None:
            req.after_saved_bytes = after_saved_bytes
        else:
            req.now = True
        m = await self._call(self.scenario.Reconfigure, req)
        return m.trigger_id

    async def inject_fault(self, vhca_id: int, fault: Fault) -> int:
        m = await self._call(
            self.scenario.InjectFault,
            spb.InjectFaultRequest(vhca_id=vhca_id, fault=convert.fault_to_pb(fault)),
        )
        return m.fault_id

    async def clear_faults(self, vhca_id: int) -> int:
        m = await self._call(self.scenario.ClearFaults, spb.ClearFaultsRequest(vhca_id=vhca_id))
        return m.cleared

    async def digest(self, vhca_id: int) -> str:
        m = await self._call(self.scenario.GetDigest, spb.GetDigestRequest(vhca_id=vhca_id))
        return m.digest

    async def apply_scenario(self, text: str) -> list[VfInfo]:
        m = await self._call(self.scenario.ApplyScenario, spb.ApplyScenarioRequest(text=text))
        return [convert.vf_info_from_pb(v) for v in m.vfs]

    async def now(self) -> float:
        m = await self._call(self.scenario.GetClock, spb.ClockRequest())
        return m.now

    async def advance_clock(self, seconds: float) -> float:
        m = await self._call(self.scenario.AdvanceClock, spb.AdvanceClockRequest(seconds=seconds))
        return m.now

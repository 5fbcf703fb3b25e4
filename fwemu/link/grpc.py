"""The firmware link to a `fwemu serve` process over gRPC.

Commands go on the firmware's CommandQueue stream (fwemu.link.cmdqueue: up to
32 in flight, answers matched by token), or as their unary RPCs to a firmware
without one.  `commands` counts them per RPC and outcome, since the gRPC
client metrics see one stream where they used to see a call per command.

SAVE completions arrive on one long-lived Completions stream and are handed to
the callback registered for their token (tokens are chosen here, in a space of
this client's own, so a completion can never race its own command's answer).
If the stream breaks, every SAVE still waiting completes with INT_ERR/ABORTED
so that no caller waits forever, and the link is down (`up`, `watch_state`)
until it subscribes again: it retries with exponential backoff (capped) until
close().  The firmware drops a client's mkeys with its completion stream (and a
restarted firmware never had them), so a break also retires every buffer the
link holds: its mkey becomes a number no firmware issues, and SAVE, LOAD or a
DMA sync on it fail with LinkError instead of reaching a reused mkey.  While
down, SAVE and alloc_buffer fail at once (their completion or mkey could not
survive).

Security: `tls` (grpcsvc.tls.ClientTls) makes the channel TLS, and mutual TLS
with a client certificate: the firmware then knows the link by its principal
(the driver's), and the mkeys it creates are that principal's alone.

Host memory: on one host, buffers are shared memory segments the firmware maps
(`memory="shm"`); across hosts the firmware holds the memory and the DMA syncs
move the bytes (`memory="remote"`).  `memory="auto"` tries shared memory first;
a buffer it cannot share is remote, and shared memory is tried again after
SHM_RETRY_S (or a reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import grpc

from grpcsvc.errors import error_info
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.tls import ClientTls, aio_channel

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import firmware_pb2_grpc as fgrpc
from ..api.v1 import scenario_pb2_grpc as sgrpc
from ..hostmem import HostMemoryError, Segment, create_segment, unlink_segment
from .base import ByteBuffer, FirmwareLink, LinkError, ScenarioLink
from .cmdqueue import CommandQueue, RpcFailed, Unqueued, rpc_failed
from .ifc import (
    MAX_U32,
    Command,
    LoadVhcaStateIn,
    MiB,
    R,
    SaveCompletion,
    SaveVhcaStateIn,
    VfInfo,
)
from .scenario_requests import A, ListVfsIn, ScenarioRequest, SetVfHoldersIn
from .wire import (
    CLIENT_KEY,
    RPCS,
    SCENARIO_RPCS,
    Rpc,
    command_to_pb,
    from_pb,
    request_to_pb,
    result_from_pb,
)

T = TypeVar("T")
_CODES = {c.value[0]: c for c in grpc.StatusCode}
MemoryMode = Literal["auto", "shm", "remote"]
DMA_CHUNK = 1 * MiB
RECONNECT_FIRST_S = 0.05  # the completion stream's backoff: first wait ...
RECONNECT_MAX_S = 2.0  # ... doubled up to this
SHM_RETRY_S = 30.0  # memory="auto": how long a failed shared memory try is not repeated

log = logging.getLogger("fwemu.link")


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
        tls: ClientTls | None = None,
    ) -> None:
        """`interceptors`: for the channel (the driver's gRPC client metrics);
        `tls`: TLS (mutual with a client certificate), else plaintext."""
        super().__init__()
        self.target = target
        self.memory = memory
        self.reconnect_backoff = (RECONNECT_FIRST_S, RECONNECT_MAX_S)
        self.shm_retry_s = SHM_RETRY_S
        self._shm_retry_at = 0.0
        self.shm_dir = shm_dir
        self.client_id = client_id or f"link-{secrets.token_hex(8)}"
        self._metadata = ((CLIENT_KEY, self.client_id),)
        # gRPC's own reconnect backoff (up to 120 s) would outlast ours.
        max_ms = int(RECONNECT_MAX_S * 1000)
        options = [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_FIRST_S * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(RECONNECT_FIRST_S * 1000)),
            ("grpc.max_reconnect_backoff_ms", max_ms),
        ]
        self.channel = aio_channel(
            target, tls, options=options, interceptors=list(interceptors) or None
        )
        self.fw = fgrpc.FirmwareStub(self.channel)
        self.scenario = sgrpc.ScenarioStub(self.channel)
        self._token_base = secrets.randbits(31) << 32
        self._tokens = itertools.count(1)
        # Firmware commands: on the CommandQueue stream, in a token space of their own.
        self.queue = CommandQueue(self._open_queue, secrets.randbits(31) << 32)
        # Commands sent, by (Firmware RPC, how they ended: OK or the gRPC code).
        self.commands: Counter[tuple[str, str]] = Counter()
        self._buffers: dict[int, ShmBuffer | ByteBuffer] = {}
        # Buffers of a completion stream that broke, by the mkey they have
        # now (above 32 bits: no firmware's), with why their mkey went away.
        self._retired: dict[int, tuple[ShmBuffer | ByteBuffer, str]] = {}
        self._retired_ids = itertools.count(MAX_U32 + 1)
        self._up = False
        self._streams = 0  # completion streams subscribed so far
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
        tls: ClientTls | None = None,
    ) -> GrpcLink:
        """Connect and subscribe to completions; fails if the firmware does not
        answer (or refuses the principal: PERMISSION_DENIED)."""
        link = cls(target, memory=memory, shm_dir=shm_dir, interceptors=interceptors, tls=tls)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link._stream_task = asyncio.create_task(link._completions(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except (TimeoutError, LinkError) as e:
            await link.close()
            raise LinkError(f"cannot reach the firmware at {target}: {e}") from None
        return link

    # --- completions -----------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    async def _completions(self, ready: asyncio.Future[None]) -> None:
        """Subscribe, and again after every break (backoff), until close()."""
        first, cap = self.reconnect_backoff
        delay = first
        try:
            while True:
                why, subscribed = await self._subscribe(ready)
                self._went_down(why)
                if not ready.done():
                    ready.set_exception(LinkError(why))
                    return  # connect() failed: its caller decides whether to retry
                if subscribed:
                    delay = first
                await asyncio.sleep(delay)
                delay = min(2 * delay, cap)
        except asyncio.CancelledError:
            self._went_down("link closed", closing=True)
            if not ready.done():
                ready.set_exception(LinkError("link closed"))
            raise

    async def _subscribe(self, ready: asyncio.Future[None]) -> tuple[str, bool]:
        """One completion stream, until it breaks: (why, whether it subscribed)."""
        subscribed = False
        try:
            stream = self.fw.Completions(fpb.CompletionsRequest(), metadata=self._metadata)
            async for msg in stream:
                if msg.token == 0:
                    subscribed = True
                    self._came_up()
                    if not ready.done():
                        ready.set_result(None)
                    continue
                self._complete(from_pb(SaveCompletion, msg))
        except grpc.aio.AioRpcError as e:
            return f"firmware connection lost: {e.code().name} {e.details()}", subscribed
        return "completion stream ended", subscribed

    def _came_up(self) -> None:
        self._up = True
        self._streams += 1
        self._shm_retry_at = 0.0  # perhaps another firmware, on this host
        self.queue.unimplemented = False  # perhaps another firmware, with a command queue
        log.info("firmware link to %s up", self.target)
        self._state_changed(True, "completion stream subscribed")

    def _went_down(self, why: str, *, closing: bool = False) -> None:
        """Fail what was in flight at once, retire the buffers, tell the watchers
        (a warning, unless the link's owner closed it)."""
        was_up, self._up = self._up, False
        self._abort_waiting(why, asyncio.get_running_loop().time())
        self._retire_buffers(why)
        if was_up:
            level = logging.INFO if closing else logging.WARNING
            log.log(level, "firmware link to %s down: %s", self.target, why)
            self._state_changed(False, why)

    def _retire_buffers(self, why: str) -> None:
        for buf in self._buffers.values():
            buf.mkey = next(self._retired_ids)
            self._retired[buf.mkey] = (buf, why)
        self._buffers.clear()

    def _check_live(self, mkey: int) -> None:
        retired = self._retired.get(mkey)
        if retired is not None:
            raise LinkError(
                f"the buffer's mkey went away with the completion stream ({retired[1]}); "
                "the firmware does not have it"
            )

    # --- calls -------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await fn(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise rpc_failed(e) from None

    # --- FirmwareLink --------------------------------------------------------------

    async def exec(self, cmd: Command[R]) -> R:
        """One command on the command queue (fwemu.link.cmdqueue); as its unary
        RPC when the firmware has no queue.  Counted in `commands`."""
        if isinstance(cmd, (SaveVhcaStateIn, LoadVhcaStateIn)):
            self._check_live(cmd.mkey)
            if isinstance(cmd, SaveVhcaStateIn) and not self._up:
                raise LinkError("completion stream down: a SAVE's completion would be lost")
        rpc = RPCS[type(cmd)]
        try:
            m = await self._answer(cmd, rpc)
        except RpcFailed as e:
            self.commands[rpc.name, e.code.name] += 1
            raise
        self.commands[rpc.name, "OK"] += 1
        return result_from_pb(cmd, m)

    async def _answer(self, cmd: Command[Any], rpc: Rpc) -> Any:
        """The response message of `cmd`, from the queue or its unary RPC."""
        if not self.queue.unimplemented:
            try:
                a = await self.queue.run(cmd)
            except Unqueued:
                pass  # the firmware predates the queue: as a unary RPC
            else:
                if a.WhichOneof("answer") == "refused":
                    r = a.refused
                    raise RpcFailed(r.message, _CODES.get(r.code, grpc.StatusCode.UNKNOWN))
                return getattr(a, rpc.queued)
        return await self._call(getattr(self.fw, rpc.name), command_to_pb(cmd))

    def _open_queue(self, requests: AsyncIterator[fpb.CommandQueueRequest]) -> Any:
        return self.fw.CommandQueue(requests, metadata=self._metadata)

    def _save_token(self) -> int:
        # This client's own token space: a completion never races its command's answer.
        return self._token_base | next(self._tokens)

    async def alloc_buffer(self, length: int) -> ShmBuffer | ByteBuffer:
        if length <= 0:
            raise ValueError("buffer length must be positive")
        if not self._up:
            raise LinkError("completion stream down: the firmware would drop the mkey")
        buf: ShmBuffer | ByteBuffer
        streams = self._streams
        now = asyncio.get_running_loop().time()
        if self.memory == "shm" or (self.memory == "auto" and now >= self._shm_retry_at):
            try:
                buf = await self._alloc_shm(length)
            except LinkError:
                if self.memory == "shm":
                    raise
                # The firmware cannot see our memory (another host, or no
                # room in /dev/shm now): this buffer is remote; try later.
                self._shm_retry_at = now + self.shm_retry_s
            else:
                return self._register(buf, streams)
        m = await self._call(self.fw.CreateMkey, fpb.CreateMkeyRequest(length=length, remote=True))
        if m.status:
            raise LinkError(f"CREATE_MKEY failed: status {m.status:#x}: {m.diagnostic}")
        return self._register(ByteBuffer(m.mkey, bytearray(length)), streams)

    def _register(self, buf: ShmBuffer | ByteBuffer, streams: int) -> ShmBuffer | ByteBuffer:
        self._buffers[buf.mkey] = buf
        if streams != self._streams:
            # The stream broke during CREATE_MKEY: which firmware has the mkey is unknown.
            self._retire_buffers("completion stream broke during CREATE_MKEY")
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
        except BaseException:
            seg.close()
            raise
        finally:
            unlink_segment(seg.name, self.shm_dir)
        if m.status:
            seg.close()
            raise LinkError(f"CREATE_MKEY failed: status {m.status:#x}: {m.diagnostic}")
        return ShmBuffer(m.mkey, seg)

    async def free_buffer(self, buf: Any) -> None:
        if self._retired.pop(buf.mkey, None) is None:
            self._buffers.pop(buf.mkey, None)
            with contextlib.suppress(LinkError):
                await self._call(self.fw.DestroyMkey, fpb.DestroyMkeyRequest(mkey=buf.mkey))
        if isinstance(buf, ShmBuffer):
            buf.segment.close()

    async def dma_sync_for_cpu(self, buf: Any, offset: int, length: int) -> None:
        if not isinstance(buf, ByteBuffer) or length <= 0:
            return  # shared memory: the bytes are ours already, even if the mkey went away
        self._check_live(buf.mkey)
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
        self._check_live(buf.mkey)
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
        await self.queue.close()
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkError):
                await self._stream_task
        for buf in [*self._buffers.values(), *(b for b, _ in self._retired.values())]:
            if isinstance(buf, ShmBuffer):
                buf.segment.close()
        self._buffers.clear()
        self._retired.clear()
        await self.channel.close(None)

    # --- ScenarioLink --------------------------------------------------------------

    async def control(self, req: ScenarioRequest[A]) -> A:
        rpc = SCENARIO_RPCS[type(req)]
        stub = self.fw if rpc.service == "Firmware" else self.scenario
        m = await self._call(getattr(stub, rpc.name), request_to_pb(req))
        return cast(A, rpc.answer(m))

    async def list_vfs(self, function_ids: Sequence[int] = ()) -> list[VfInfo]:
        return await self.control(ListVfsIn(tuple(function_ids)))

    async def set_vf_holders(self, vhca_id: int, principals: frozenset[str]) -> None:
        await self.control(SetVfHoldersIn(vhca_id, frozenset(principals)))

"""The Vfio gRPC service: a thin adapter from RPCs to the VFIO core and the
mlx5vf driver.  Decode, call, encode; a VfioError becomes its errno."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from ..api.v1 import vfio_pb2 as pb
from ..api.v1 import vfio_pb2_grpc as pbg
from ..registry import DRIVER_NAME, DeviceRegistry
from ..vfio.errors import VfioError
from ..vfio.ops import MigrationFile
from ..vfio.uapi import PRECOPY_INFO, VFIO_MIG_GET_PRECOPY_INFO
from ..vfio.usermem import UserMemory
from .errnos import abort_errno
from .process import DataFd, DeviceFd, Process

Ctx = grpc.aio.ServicerContext[Any, Any]

CLIENT_KEY = "x-vfio-client"
MAX_READ = 16 << 20  # one message; read(2) may return less than asked anyway
DEFAULT_CHUNK = 1 << 20


class VfioServicer(pbg.VfioServicer):
    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry
        self.processes: dict[str, Process] = {}
        # Set when the server starts to stop: Session streams end (they are
        # no work in progress to drain) and fds are closed once calls drained.
        self.stopping = asyncio.Event()

    # --- callers -----------------------------------------------------------------------

    def process(self, context: Ctx) -> Process:
        client = None
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_KEY and isinstance(value, str):
                client = value
        if client is None:
            client = f"peer:{context.peer()}"
        proc = self.processes.get(client)
        if proc is None:
            proc = self.processes[client] = Process(client)
        return proc

    async def Session(
        self, request: pb.SessionRequest, context: Ctx
    ) -> AsyncIterator[pb.SessionEvent]:
        proc = self.process(context)
        proc.sessions += 1
        try:
            yield pb.SessionEvent(client=proc.client)
            await self.stopping.wait()  # or until the client goes away
        finally:
            proc.sessions -= 1
            if proc.sessions == 0 and not self.stopping.is_set():
                await asyncio.shield(self._exit(proc))

    async def _exit(self, proc: Process) -> None:
        # Out of the table first: the client id starts afresh if it comes back.
        if self.processes.get(proc.client) is proc:
            del self.processes[proc.client]
        await proc.exit()

    async def close_all(self) -> None:
        self.stopping.set()
        for proc in list(self.processes.values()):
            await self._exit(proc)

    # --- devices ----------------------------------------------------------------------

    async def ListDevices(self, request: pb.ListDevicesRequest, context: Ctx) -> Any:
        try:
            regs = await self.registry.refresh()
        except VfioError as e:
            await abort_errno(context, e)
        return pb.ListDevicesResponse(
            devices=[
                pb.DeviceInfo(
                    name=r.core.name,
                    vhca_id=r.mvdev.caps.vhca_id,
                    function_id=r.mvdev.function_id,
                    migratable=r.mvdev.migratable,
                    migration_flags=r.mvdev.migration_flags,
                    open_count=r.core.open_count,
                    driver=DRIVER_NAME,
                )
                for r in regs
            ]
        )

    async def OpenDevice(self, request: pb.OpenDeviceRequest, context: Ctx) -> Any:
        proc = self.process(context)
        try:
            reg = await self.registry.lookup(request.name)
            await reg.core.open()
            try:
                fd = proc.install(DeviceFd(reg.core))
            except VfioError:
                await reg.core.close()
                raise
        except VfioError as e:
            await abort_errno(context, e)
        return pb.OpenDeviceResponse(fd=fd)

    async def Close(self, request: pb.CloseRequest, context: Ctx) -> Any:
        try:
            await self.process(context).close(request.fd)
        except VfioError as e:
            await abort_errno(context, e)
        return pb.CloseResponse()

    async def DeviceFeature(self, request: pb.DeviceFeatureRequest, context: Ctx) -> Any:
        proc = self.process(context)
        new_fd = -1
        try:
            user = _user_memory(request.user_memory)
            device = proc.device(request.fd)

            def install(file: MigrationFile) -> int:
                nonlocal new_fd
                new_fd = proc.install(DataFd(file, device))
                return new_fd

            data = await device.device_feature(
                request.argsz, request.flags, request.data, user=user, install_fd=install
            )
        except VfioError as e:
            await abort_errno(context, e)
        return pb.DeviceFeatureResponse(
            data=data,
            user_memory=[pb.UserBuffer(addr=a, data=bytes(b)) for a, b in user.buffers.items()],
            data_fd=new_fd,
        )

    async def DeviceReset(self, request: pb.DeviceResetRequest, context: Ctx) -> Any:
        try:
            await self.process(context).device(request.fd).reset()
        except VfioError as e:
            await abort_errno(context, e)
        return pb.DeviceResetResponse()

    # --- data fds ------------------------------------------------------------------------

    async def Read(self, request: pb.ReadRequest, context: Ctx) -> Any:
        try:
            file = self.process(context).data(request.fd)
            data = await file.read(min(request.count, MAX_READ), nonblock=request.nonblock)
        except VfioError as e:
            await abort_errno(context, e)
        return pb.ReadResponse(data=data)

    async def ReadStream(
        self, request: pb.ReadStreamRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadResponse]:
        chunk = min(request.chunk_size or DEFAULT_CHUNK, MAX_READ)
        left = request.limit or -1
        try:
            file = self.process(context).data(request.fd)
            while left != 0:
                n = chunk if left < 0 else min(chunk, left)
                data = await file.read(n, nonblock=request.nonblock)
                if not data:
                    return
                if left > 0:
                    left -= len(data)
                yield pb.ReadResponse(data=data)
        except VfioError as e:
            await abort_errno(context, e)

    async def Write(self, request_iterator: AsyncIterator[pb.WriteRequest], context: Ctx) -> Any:
        proc = self.process(context)
        written = 0
        file: MigrationFile | None = None
        try:
            async for req in request_iterator:
                if file is None:
                    file = proc.data(req.fd)
                written += await file.write(req.data)
        except VfioError as e:
            await abort_errno(context, e, {"written": str(written)})
        return pb.WriteResponse(written=written)

    async def PrecopyInfo(self, request: pb.PrecopyInfoRequest, context: Ctx) -> Any:
        try:
            entry = self.process(context).get(request.fd)
            if isinstance(entry, DeviceFd):
                raise VfioError(errno.ENOTTY, "VFIO_MIG_GET_PRECOPY_INFO is a data fd ioctl")
            arg = PRECOPY_INFO.pack(
                request.argsz, request.flags, request.initial_bytes, request.dirty_bytes
            )
            out = await entry.file.ioctl(VFIO_MIG_GET_PRECOPY_INFO, arg)
        except VfioError as e:
            await abort_errno(context, e)
        argsz, flags, initial, dirty = PRECOPY_INFO.unpack_from(out, 0)
        return pb.PrecopyInfoResponse(
            argsz=argsz, flags=flags, initial_bytes=initial, dirty_bytes=dirty
        )


def _user_memory(buffers: Iterable[pb.UserBuffer]) -> UserMemory:
    """The caller's address space; buffers that overlap (or share an address)
    describe none, so their addresses are bad: EFAULT."""
    mem: dict[int, bytearray] = {}
    for b in buffers:
        if b.addr in mem:
            raise VfioError(errno.EFAULT, f"two user buffers at {b.addr:#x}")
        mem[b.addr] = bytearray(b.data)
    try:
        return UserMemory(mem)
    except ValueError as e:
        raise VfioError(errno.EFAULT, f"user memory: {e}") from None

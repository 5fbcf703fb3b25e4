"""The baseline for driver benchmarks: a gRPC server with the driver's own
messages and nothing behind them.  ReadStream sends `limit` bytes of
preallocated data in chunk_size messages; PrecopyInfo answers at once, as a
unary call and on the Ioctl stream.  Run in
its own process, as the driver is.

    python benchmarks/baseline_server.py --listen 127.0.0.1:0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc

from driver.api.v1 import vfio_pb2 as pb
from driver.api.v1 import vfio_pb2_grpc as pbg
from grpcsvc.runner import run
from grpcsvc.server import GrpcService, stop_on_signals


class Baseline(pbg.VfioServicer):
    def __init__(self) -> None:
        self._chunks: dict[int, bytes] = {}

    async def ReadStream(
        self, request: pb.ReadStreamRequest, context: Any
    ) -> AsyncIterator[pb.ReadResponse]:
        size = request.chunk_size or 1 << 20
        chunk = self._chunks.setdefault(size, bytes(size))
        left = request.limit
        while left > 0:
            n = min(size, left)
            yield pb.ReadResponse(data=chunk if n == size else chunk[:n])
            left -= n

    async def PrecopyInfo(self, request: pb.PrecopyInfoRequest, context: Any) -> Any:
        return pb.PrecopyInfoResponse(argsz=request.argsz, flags=0, initial_bytes=0, dirty_bytes=0)

    async def Ioctl(
        self, request_iterator: AsyncIterator[pb.IoctlRequest], context: Any
    ) -> AsyncIterator[pb.IoctlAnswer]:
        """The raw stream baseline of the Ioctl stream: each PrecopyInfo answered at once."""
        async for request in request_iterator:
            yield pb.IoctlAnswer(
                precopy_info=pb.PrecopyInfoResponse(argsz=request.precopy_info.argsz)
            )


async def main(listen: str) -> None:
    def register(server: grpc.aio.Server) -> None:
        pbg.add_VfioServicer_to_server(Baseline(), server)  # type: ignore[abstract]

    service = GrpcService(["vfio.v1.Vfio"], register)
    stop = stop_on_signals()
    port = await service.start(listen)
    print(f"baseline: serving on {listen.rpartition(':')[0]}:{port}", flush=True)
    await service.serve_until(stop, 0.5)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    run(main(p.parse_args().listen))

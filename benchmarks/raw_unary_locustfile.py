"""The raw unary baseline of benchmarks/reinit_load_bench.py: Locust users
calling PrecopyInfo of benchmarks/baseline_server.py (a server with nothing
behind it) on gRPC's sync API under gevent, as vfio-loadtest's users call
the driver, as fast as it answers."""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, constant, task  # noqa: E402

from driver.api.v1 import vfio_pb2 as pb  # noqa: E402
from driver.api.v1 import vfio_pb2_grpc as pbg  # noqa: E402


class RawUnaryUser(User):
    wait_time = constant(0)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        assert self.host, "--host: the baseline server"
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pbg.VfioStub(self.channel)
        self.request = pb.PrecopyInfoRequest(fd=3, argsz=24)

    @task
    def precopy_info(self) -> None:
        t = time.perf_counter()
        error = None
        try:
            self.stub.PrecopyInfo(self.request, timeout=10)
        except grpc.RpcError as e:
            error = e
        self.environment.events.request.fire(
            request_type="raw",
            name="PrecopyInfo",
            response_time=(time.perf_counter() - t) * 1000,
            response_length=0,
            exception=error,
            context={},
        )

    def on_stop(self) -> None:
        self.channel.close()

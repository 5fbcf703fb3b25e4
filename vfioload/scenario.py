"""The Scenario calls a load test makes, on gRPC's synchronous API (safe
under gevent once grpc.experimental.gevent.init_gevent() ran): VFs on
demand, reconfigurations, faults, digests.  Errors are ScenarioError, an
OSError with the errno the service's ErrorInfo carries (EIO if none)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as spbg
from grpcsvc.errors import error_info
from grpcsvc.options import CHANNEL_OPTIONS
from grpcsvc.tls import ClientTls, sync_channel

T = TypeVar("T")
TIMEOUT_S = 30.0


class ScenarioError(OSError):
    pass


@dataclass(frozen=True)
class Vf:
    vhca_id: int
    function_id: int


class SyncScenario:
    """One Scenario service (fwemu serve, or a driver's --scenario-service)."""

    def __init__(self, target: str, tls: ClientTls | None) -> None:
        self.target = target
        self.channel = sync_channel(target, tls, options=CHANNEL_OPTIONS)
        self.stub = spbg.ScenarioStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, rpc: Callable[..., T], request: Any) -> T:
        try:
            return rpc(request, timeout=TIMEOUT_S)
        except grpc.RpcError as e:
            raise _error(e) from None

    def create_vfs(self, count: int, **config: Any) -> list[Vf]:
        r = self._call(
            self.stub.CreateVfs,
            spb.CreateVfsRequest(count=count, config=spb.VfConfig(**config)),
        )
        return [Vf(v.vhca_id, v.function_id) for v in r.vfs]

    def remove_vf(self, vhca_id: int) -> None:
        self._call(self.stub.RemoveVf, spb.RemoveVfRequest(vhca_id=vhca_id))

    def reconfigure(self, vhca_id: int, **extra: Any) -> int:
        """A reconfiguration now, of the VF's reconfig_bytes, REPLACE by default
        (the oldest objects make room: a VF reconfigured for hours keeps its
        size), or as `extra`'s fields say."""
        extra.setdefault("mode", spb.RECONFIGURE_MODE_REPLACE)
        request = spb.ReconfigureRequest(vhca_id=vhca_id, now=True, **extra)
        return self._call(self.stub.Reconfigure, request).trigger_id

    def reset_vf(self, vhca_id: int) -> None:
        """Back to the VF's seeded state (a fresh VF of the same config and seed)."""
        self._call(self.stub.ResetVf, spb.ResetVfRequest(vhca_id=vhca_id))

    def inject_fault(self, vhca_id: int, **fault: Any) -> int:
        request = spb.InjectFaultRequest(vhca_id=vhca_id, fault=spb.Fault(**fault))
        return self._call(self.stub.InjectFault, request).fault_id

    def clear_faults(self, vhca_id: int) -> int:
        return self._call(self.stub.ClearFaults, spb.ClearFaultsRequest(vhca_id=vhca_id)).cleared

    def digest(self, vhca_id: int) -> str:
        return self._call(self.stub.GetDigest, spb.GetDigestRequest(vhca_id=vhca_id)).digest


def _error(e: grpc.RpcError) -> ScenarioError:
    assert isinstance(e, grpc.Call)
    code = error_info(e).metadata.get("errno", "")
    number = int(code) if code.isdigit() else errno.EIO
    return ScenarioError(number, f"Scenario {e.code().name}: {e.details()}")

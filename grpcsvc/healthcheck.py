"""`grpc-health-check`: the standard grpc.health.v1 Check as a command, for
container HEALTHCHECKs and Kubernetes exec probes (grpc_health_probe's job,
which is not to be had here).

Exit 0 when the service is SERVING, 1 otherwise (NOT_SERVING, unknown service,
unreachable, no answer in time, a failed TLS handshake) with one line on stderr
saying why; 2 for usage errors (a TLS file that cannot be read among them). A
probe is a short-lived process of its own, so it uses the sync gRPC stack.

TLS as every client's (grpcsvc.tls): --tls-ca/--tls-cert/--tls-key, else
VFIO_TLS_CA/CERT/KEY; a service with --tls-client-ca needs the client
certificate, which is why Kubernetes runs this as an exec probe rather than
the kubelet's own gRPC probe (it has none to present).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .tls import ClientTls, TlsError, add_client_args, client_tls_from_args, sync_channel

PROG = "grpc-health-check"


def check(
    target: str, service: str = "", timeout: float = 1.0, tls: ClientTls | None = None
) -> str | None:
    """None when `service` on `target` is SERVING, else why not (one line).
    `tls`: over TLS (TlsError if its files cannot be read)."""
    request = health_pb2.HealthCheckRequest(service=service)
    with sync_channel(target, tls) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as e:
            return _rpc_failure(e, service, timeout)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return f"{_name(service)} is {status}"


def _name(service: str) -> str:
    return f"service {service!r}" if service else "the server"


def _rpc_failure(e: grpc.RpcError, service: str, timeout: float) -> str:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.UNAVAILABLE and any(
        w in (details or "").lower() for w in ("ssl", "handshake", "certificate")
    ):
        return f"TLS handshake failed (see --tls-ca/--tls-cert/--tls-key): {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"unreachable: {details}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g} s"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{_name(service)} is unknown to the server"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "the server has no grpc.health.v1 service"
    name = code.name if code is not None else "error"
    return f"Check failed: {name}: {details}"


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Call grpc.health.v1.Health/Check on HOST:PORT. Exit 0 when SERVING, "
        "1 otherwise (NOT_SERVING, unknown service, unreachable, timeout) with the reason "
        "on stderr, 2 for usage errors.",
    )
    p.add_argument("target", metavar="HOST:PORT", help="the gRPC server")
    p.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="the service to check (default '': the server as a whole)",
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=1.0,
        metavar="S",
        help="limit for connecting and the call, in seconds (default 1)",
    )
    add_client_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        why = check(args.target, args.service, args.timeout, client_tls_from_args(args))
    except TlsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if why is not None:
        print(f"{PROG}: {args.target}: {why}", file=sys.stderr)
        return 1
    print(f"{args.target}: {_name(args.service)} is SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main())

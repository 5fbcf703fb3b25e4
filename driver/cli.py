"""The `vfio-driver` command: serve VFIO devices backed by emulated mlx5 VFs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from fwemu.embedded import ScenarioError, memory_limit_arg
from fwemu.link.base import LinkError
from grpcsvc import access
from grpcsvc.heap import freeze_startup_heap
from grpcsvc.logs import add_log_flags, announce, setup_logging
from grpcsvc.memory import return_large_buffers_to_the_os
from grpcsvc.metrics import GrpcClientMetrics
from grpcsvc.observability import add_metrics_flags, announce_metrics, serve_metrics
from grpcsvc.runner import LoopName, add_loop_flag, run_main
from grpcsvc.server import (
    ListenError,
    add_serve_command,
    listen_options,
    served_address,
    stop_on_signals,
)
from grpcsvc.tls import ClientTls, TlsError, add_client_args, client_tls_from_args
from grpcsvc.units import byte_size, byte_size_between, seconds_between

from .mlx5.cmd import DEFAULT_BUFFER_BUDGET
from .priority import DEFAULT_MAX_WAIT_S, MAX_PRIORITY_WAIT_S, priority_wait_arg
from .service.process import CLIENT_IDLE
from .shards import SHARDS_ENV, ShardSpecError, shards_argument, shards_from_env
from .vfio.errors import VfioError

if TYPE_CHECKING:
    import grpc

    from fwemu.embedded import EmbeddedFirmware
    from fwemu.link.base import FirmwareLink
    from fwemu.link.grpc import GrpcLink

    from .service.server import DriverServer

log = logging.getLogger("vfio-driver")

# Bounds of the operator's settings: past them a value is a typo, not a policy.
MAX_BUFFER_BUDGET = 1 << 40
MAX_CLIENT_IDLE = 7 * 24 * 3600.0
GRACE_S = 5.0  # on SIGTERM: how long calls in progress may finish


def _duration(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low_ok = value >= 0 if zero else value > 0
    if not low_ok or value == math.inf:
        what = "zero or a positive" if zero else "a positive"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} number of seconds")
    return value


def _seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    return _duration(text, zero=False)


def _wait(text: str) -> float:
    """argparse type: zero or a positive number of seconds."""
    return _duration(text, zero=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfio-driver",
        description="The VFIO migration driver (VFIO core + mlx5vf) over emulated mlx5 VFs.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = add_serve_command(
        sub,
        help="serve VFIO devices over gRPC",
        description="Serve one VFIO device per VF of a firmware: a running fwemu "
        "(--firmware), or a firmware model embedded in this process.",
        listen="127.0.0.1:50052",
    )
    fw = s.add_mutually_exclusive_group()
    fw.add_argument("--firmware", metavar="HOST:PORT", help="a running `fwemu serve`")
    fw.add_argument(
        "--firmware-shards",
        type=shards_argument,
        metavar="SPEC",
        help="several `fwemu serve --shard K`, shard k's VFs as PCI domain k: "
        "HOST:PORT,HOST:PORT,... (shard i = the i-th) or TEMPLATE@N with {shard} in "
        f"TEMPLATE (shards 0..N-1); default ${SHARDS_ENV} when neither flag is given",
    )
    add_client_args(s, prefix="firmware-tls")  # the firmware link's TLS
    access.add_role_args(s, drivers=False)
    s.add_argument(
        "--firmware-wait",
        type=_wait,
        default=0.0,
        metavar="SECONDS",
        help="at start, retry a firmware that does not answer for up to SECONDS "
        "(default 0: fail at once, naming it)",
    )
    s.add_argument(
        "--memory",
        choices=["auto", "shm", "remote"],
        default="auto",
        help="how image bytes reach the firmware (auto: shared memory if it can)",
    )
    s.add_argument(
        "--shm-dir",
        metavar="DIR",
        help="where clients' user memory segments are (MapUserMemory, the local "
        "data path; default /dev/shm); a client whose segments are elsewhere uses gRPC",
    )
    s.add_argument(
        "--cmd-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long a firmware command may take (mlx5 command timeout)",
    )
    s.add_argument(
        "--buffer-budget",
        type=byte_size_between(1 << 20, MAX_BUFFER_BUDGET),
        default=DEFAULT_BUFFER_BUDGET,
        metavar="BYTES",
        help="data buffers one client's migration files may hold over all devices; "
        "past it an allocation is ENOMEM (default 1GiB; 1MiB to 1TiB)",
    )
    s.add_argument(
        "--switchover-priority",
        type=priority_wait_arg,
        default=DEFAULT_MAX_WAIT_S,
        metavar="SECONDS",
        help="while a principal's devices switch over (PRE_COPY_P2P, STOP_COPY), its "
        "precopy requests (PRECOPY_INFO, MIG_DATA_SIZE, precopy reads) wait up to this "
        f"long each (default {DEFAULT_MAX_WAIT_S:g}; 0: off; at most "
        f'{MAX_PRIORITY_WAIT_S:g}); README, "Switchover priority"',
    )
    s.add_argument(
        "--client-idle",
        type=seconds_between(0.0, MAX_CLIENT_IDLE),
        default=CLIENT_IDLE,
        metavar="SECONDS",
        help=f"how long a client with nothing open is remembered (default {CLIENT_IDLE:g}; "
        f"at most {MAX_CLIENT_IDLE:g})",
    )
    emb = s.add_argument_group("embedded firmware (without --firmware or --firmware-shards)")
    emb.add_argument(
        "--scenario", metavar="FILE", help="YAML or JSON scenario to apply at start (as fwemu's)"
    )
    emb.add_argument(
        "--vfs",
        type=int,
        default=None,
        metavar="N",
        help="VFs to create (default 4 without --scenario, else 0)",
    )
    emb.add_argument("--size", type=byte_size, default=4 << 20, help="state per VF (default 4MiB)")
    emb.add_argument(
        "--dirty-rate",
        type=byte_size,
        default=1 << 20,
        metavar="BYTES_PER_S",
        help="workload dirtying rate while a VF runs (default 1MiB)",
    )
    emb.add_argument(
        "--seed", type=int, default=0, help="seed of the VFs' contents and workload (default 0)"
    )
    emb.add_argument(
        "--memory-limit",
        type=memory_limit_arg,
        default=None,
        metavar="BYTES",
        help="the embedded firmware's memory limit (as `fwemu serve --memory-limit`; "
        "default: 3/4 of the machine's memory or its cgroup's limit)",
    )
    emb.add_argument(
        "--scenario-service",
        action="store_true",
        help="also serve the firmware's fwemu.api.v1.Scenario service (digests, "
        "reconfigurations, faults) on the same port",
    )
    add_loop_flag(s)
    add_log_flags(s)
    add_metrics_flags(s, per="device")
    return p


def _embedded_firmware(args: argparse.Namespace) -> EmbeddedFirmware:
    """The firmware of embedded mode, from the parsed options."""
    from fwemu.embedded import EmbeddedFirmware

    return EmbeddedFirmware.build(
        size=args.size,
        dirty_rate=args.dirty_rate,
        seed=args.seed,
        scenario=args.scenario,
        vfs=args.vfs,
        memory_limit=args.memory_limit,
    )


def _driver_server(
    args: argparse.Namespace,
    links: list[FirmwareLink],
    fw: EmbeddedFirmware | None,
    metrics: CollectorRegistry | None,
) -> DriverServer:
    """The driver service over `links`, from the parsed options."""
    from .registry import DeviceRegistry
    from .service.server import DriverServer

    return DriverServer(
        DeviceRegistry(
            links,
            cmd_timeout=args.cmd_timeout,
            buffer_budget=args.buffer_budget,
            switchover_priority=args.switchover_priority,
        ),
        firmware=fw,
        scenario_service=args.scenario_service,
        metrics=metrics,
        per_device_limit=args.metrics_per_device,
        shm_dir=args.shm_dir,
        client_idle=args.client_idle,
        roles=access.roles(args),
    )


async def _serve(args: argparse.Namespace) -> int:
    links: list[FirmwareLink]
    fw = None
    metrics = CollectorRegistry() if args.metrics_listen else None
    if args.firmware or args.firmware_shards:
        # The driver's calls to the firmware, as gRPC client metrics.
        interceptors = GrpcClientMetrics(metrics).interceptors() if metrics is not None else []
        targets = [args.firmware] if args.firmware else list(args.firmware_shards.addresses)
        links = list(await _connect_all(targets, args, interceptors))
        where = args.firmware or f"firmware shards {args.firmware_shards.spec}"
    else:
        fw = _embedded_firmware(args)
        links = [fw.link]
        where = "embedded firmware"
    try:
        server = _driver_server(args, links, fw, metrics)
        stop = stop_on_signals(log, GRACE_S)
        with serve_metrics(args.metrics_listen, metrics, "vfio-driver") as metrics_port:
            port = await server.start(args.listen, **listen_options(args))
            # Set up: out of the full collections' way (grpcsvc.heap).
            if getattr(args, "own_process", False):
                frozen = freeze_startup_heap()
                log.debug("%d start-up objects frozen out of full GC collections", frozen)
            address = served_address(args.listen, port)
            n = len(server.registry.devices)
            announce(
                log,
                f"vfio-driver: serving {n} devices on {address}",
                "vfio-driver serving %d devices on %s (%s)",
                n,
                address,
                where,
            )
            announce_metrics(args.metrics_listen, metrics_port, "vfio-driver")
            await server.serve_until(stop, GRACE_S)
    finally:
        for link in links:
            await link.close()
    log.info("vfio-driver stopped")
    return 0


async def _connect_all(
    targets: list[str], args: argparse.Namespace, interceptors: list[grpc.aio.ClientInterceptor]
) -> list[GrpcLink]:
    """One link per firmware (shard k = targets[k]), connected concurrently.
    If any cannot be reached the others are closed and the error names it
    (and its shard, when there are shards)."""
    got = await asyncio.gather(
        *(_connect(t, args, interceptors) for t in targets), return_exceptions=True
    )
    links = [r for r in got if not isinstance(r, BaseException)]
    failed = [(k, r) for k, r in enumerate(got) if isinstance(r, BaseException)]
    if not failed:
        return links
    for link in links:
        await link.close()
    for _, e in failed:
        if not isinstance(e, LinkError):
            raise e
    if args.firmware:
        raise failed[0][1]
    raise LinkError("; ".join(f"shard {k} ({targets[k]}): {e}" for k, e in failed))


async def _connect(
    target: str, args: argparse.Namespace, interceptors: list[grpc.aio.ClientInterceptor]
) -> GrpcLink:
    """GrpcLink.connect, retried for --firmware-wait seconds (a StatefulSet's
    firmware pods may start after the driver)."""
    from fwemu.link.grpc import GrpcLink

    tls: ClientTls | None = args.firmware_tls
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.firmware_wait
    delay = first_delay = 0.25
    while True:
        try:
            return await GrpcLink.connect(
                target, memory=args.memory, interceptors=interceptors, tls=tls
            )
        except LinkError as e:
            if loop.time() + delay > deadline:
                if args.firmware_wait:
                    raise LinkError(f"{e} (retried for {args.firmware_wait:g} s)") from None
                raise
            if delay == first_delay:
                log.info("waiting up to %g s for the firmware at %s", args.firmware_wait, target)
        await asyncio.sleep(delay)
        delay = min(2 * delay, 5.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The program itself (its command line), not a caller in its own process
    # (a test): only then is the process's heap ours to freeze.
    args.own_process = argv is None
    source = "--firmware-shards"
    if not args.firmware and args.firmware_shards is None:
        # The manifests configure the shards this way (deploy/k8s).
        source = SHARDS_ENV
        try:
            args.firmware_shards = shards_from_env(os.environ)
        except ShardSpecError as e:
            parser.error(str(e))
    if args.firmware or args.firmware_shards:
        # The firmware processes own their VFs: these would be silently ignored.
        given_with = "--firmware" if args.firmware else source
        for flag, given in [
            ("--scenario", args.scenario is not None),
            ("--vfs", args.vfs is not None),
            ("--scenario-service", args.scenario_service),
            ("--memory-limit", args.memory_limit is not None),
        ]:
            if given:
                parser.error(f"{flag} is for the embedded firmware, not with {given_with}")
    try:
        args.firmware_tls = client_tls_from_args(args, "firmware-tls")
    except TlsError as e:
        parser.error(str(e))
    if args.firmware_tls is not None and not (args.firmware or args.firmware_shards):
        parser.error("--firmware-tls-* are for a firmware link (--firmware or --firmware-shards)")
    loop: LoopName = args.loop
    return_large_buffers_to_the_os()
    setup_logging(args.log_level, args.log_format)
    return run_main(
        "vfio-driver",
        _serve(args),
        {ScenarioError: 2, (ListenError, LinkError, VfioError): 1},
        loop,
    )


if __name__ == "__main__":
    sys.exit(main())

"""The `vfio-driver` command: serve VFIO devices backed by emulated mlx5 VFs."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from fwemu.cli import byte_size
from fwemu.link.base import LinkError
from fwemu.scenario import ScenarioError
from grpcsvc.logs import add_log_flags, setup_logging
from grpcsvc.memory import return_large_buffers_to_the_os
from grpcsvc.metrics import GrpcClientMetrics
from grpcsvc.observability import add_metrics_flags, announce_metrics, serve_metrics
from grpcsvc.runner import LoopName, run
from grpcsvc.server import ListenError, stop_on_signals

from .vfio.errors import VfioError

if TYPE_CHECKING:
    from fwemu.model.firmware import Firmware

log = logging.getLogger("vfio-driver")


def _seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfio-driver",
        description="The VFIO migration driver (VFIO core + mlx5vf) over emulated mlx5 VFs.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "serve",
        help="serve VFIO devices over gRPC",
        description="Serve one VFIO device per VF of a firmware: a running fwemu "
        "(--firmware), or a firmware model embedded in this process.",
    )
    s.add_argument("--listen", default="127.0.0.1:50052", metavar="HOST:PORT")
    s.add_argument("--firmware", metavar="HOST:PORT", help="a running `fwemu serve`")
    s.add_argument(
        "--memory",
        choices=["auto", "shm", "remote"],
        default="auto",
        help="how image bytes reach the firmware (auto: shared memory if it can)",
    )
    s.add_argument(
        "--cmd-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long a firmware command may take (mlx5 command timeout)",
    )
    emb = s.add_argument_group("embedded firmware (without --firmware)")
    emb.add_argument("--scenario", metavar="FILE")
    emb.add_argument("--vfs", type=int, default=None, metavar="N")
    emb.add_argument("--size", type=byte_size, default=4 << 20)
    emb.add_argument("--dirty-rate", type=byte_size, default=1 << 20, metavar="BYTES_PER_S")
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument(
        "--scenario-service",
        action="store_true",
        help="also serve the firmware's fwemu.api.v1.Scenario service (digests, "
        "reconfigurations, faults) on the same port",
    )
    s.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    add_log_flags(s)
    add_metrics_flags(s, per="device")
    return p


async def _serve(args: argparse.Namespace) -> int:
    from .registry import DeviceRegistry, Link
    from .service.server import DriverServer

    link: Link
    fw = None
    metrics = CollectorRegistry() if args.metrics_listen else None
    if args.firmware:
        from fwemu.link.grpc import GrpcLink

        # The driver's calls to the firmware, as gRPC client metrics.
        interceptors = GrpcClientMetrics(metrics).interceptors() if metrics is not None else []
        link = await GrpcLink.connect(args.firmware, memory=args.memory, interceptors=interceptors)
    else:
        from fwemu.link.inproc import InProcessLink

        fw = _embedded_firmware(args)
        link = InProcessLink(fw)
    try:
        server = DriverServer(
            DeviceRegistry(link, cmd_timeout=args.cmd_timeout),
            scenario=fw if args.scenario_service else None,
            metrics=metrics,
            per_device_limit=args.metrics_per_device,
            firmware=fw,
        )
        stop = stop_on_signals()
        with serve_metrics(args.metrics_listen, metrics, "vfio-driver") as metrics_port:
            port = await server.start(args.listen)
            host = args.listen.rpartition(":")[0]
            n = len(server.registry.devices)
            where = args.firmware or "embedded firmware"
            log.info("vfio-driver serving %d devices on %s:%d (%s)", n, host, port, where)
            print(f"vfio-driver: serving {n} devices on {host}:{port}", flush=True)
            announce_metrics(args.metrics_listen, metrics_port, "vfio-driver")
            await server.serve_until(stop)
    finally:
        await link.close()
    return 0


def _embedded_firmware(args: argparse.Namespace) -> Firmware:
    """The firmware model as `fwemu serve` builds it from the same options."""
    from fwemu.model.clock import LoopClock
    from fwemu.model.vf import VfConfig
    from fwemu.scenario import build_firmware

    defaults = VfConfig(size=args.size, dirty_bytes_per_s=args.dirty_rate)
    return build_firmware(
        LoopClock(), defaults, seed=args.seed, scenario=args.scenario, vfs=args.vfs
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.firmware:
        # The firmware process owns its VFs: these would be silently ignored.
        for flag, given in [
            ("--scenario", args.scenario is not None),
            ("--vfs", args.vfs is not None),
            ("--scenario-service", args.scenario_service),
        ]:
            if given:
                parser.error(f"{flag} is for the embedded firmware, not with --firmware")
    loop: LoopName = args.loop
    return_large_buffers_to_the_os()
    setup_logging(args.log_level, args.log_format)
    try:
        return run(_serve(args), loop)
    except ScenarioError as e:
        print(f"vfio-driver: error: {e}", file=sys.stderr)
        return 2
    except (ListenError, LinkError, VfioError) as e:
        print(f"vfio-driver: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `fwemu` command: serve the emulated firmware, or run the demo."""

from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from grpcsvc.access import add_role_args, roles
from grpcsvc.heap import freeze_startup_heap
from grpcsvc.logs import add_log_flags, announce, setup_logging
from grpcsvc.memory import return_large_buffers_to_the_os
from grpcsvc.observability import add_metrics_flags, announce_metrics, serve_metrics
from grpcsvc.runner import LoopName, add_loop_flag, run_main
from grpcsvc.server import (
    ListenError,
    add_serve_command,
    listen_options,
    served_address,
    stop_on_signals,
)
from grpcsvc.tls import TlsError, add_client_args
from grpcsvc.units import byte_size, byte_size_between, count_between, seconds_between

from .demo import DemoError, run_demo
from .embedded import memory_limit_arg
from .link.base import LinkError
from .link.ifc import MiB, VfConfig
from .scenario import ScenarioError
from .service.memory import (
    DEFAULT_IDLE_S,
    DEFAULT_MAX_REMOTE_BYTES,
    MAX_MKEYS_PER_CLIENT,
    MAX_REMOTE_MEMORY,
)

if TYPE_CHECKING:
    from .model.firmware import Firmware
    from .service.server import FirmwareServer

log = logging.getLogger("fwemu")


MAX_SHARD = 0xFFFF  # a driver names shard k's VFs PCI domain k (driver/shards.py)
# Bounds of the operator's settings: past them a value is a typo, not a policy.
MAX_MKEYS_SETTING = 1 << 20
MAX_CLIENT_IDLE = 7 * 24 * 3600.0
GRACE_S = 5.0  # on SIGTERM: how long calls in progress may finish


def shard_number(text: str) -> int | str:
    """argparse type for --shard: K, or 'auto' (from the hostname, resolved in main)."""
    if text == "auto":
        return text
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_SHARD:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard number (0..{MAX_SHARD}) or auto")
    return int(text)


def shard_from_hostname(hostname: str) -> int:
    """A StatefulSet's pod `<name>-K` (its hostname) is shard K."""
    m = re.fullmatch(r".*-([0-9]+)", hostname.split(".", 1)[0])
    if m is None or int(m.group(1)) > MAX_SHARD:
        raise ValueError(
            f"--shard auto: hostname {hostname!r} does not end in -K "
            f"(K = 0..{MAX_SHARD}, as a StatefulSet's pods do)"
        )
    return int(m.group(1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fwemu",
        description="Emulated mlx5 VF migration firmware (QUERY/SAVE/LOAD/SUSPEND/RESUME_VHCA).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = add_serve_command(
        sub,
        help="serve VFs over gRPC",
        description="Serve emulated VFs over gRPC (Firmware and Scenario services, health, "
        "reflection). SIGTERM drains calls in progress and stops.",
        listen="127.0.0.1:50051",
    )
    s.add_argument("--scenario", metavar="FILE", help="YAML or JSON scenario to apply at start")
    s.add_argument(
        "--vfs",
        type=int,
        default=None,
        metavar="N",
        help="VFs to create (default 4 without --scenario, else 0)",
    )
    s.add_argument("--size", type=byte_size, default=VfConfig().size, help="state per VF")
    s.add_argument(
        "--dirty-rate",
        type=byte_size,
        default=VfConfig().dirty_bytes_per_s,
        metavar="BYTES_PER_S",
        help="workload dirtying rate while a VF runs",
    )
    s.add_argument(
        "--save-bandwidth",
        type=byte_size,
        default=0,
        metavar="BYTES_PER_S",
        help="SAVE speed (0 = unlimited)",
    )
    s.add_argument(
        "--save-latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="each SAVE's fixed time, before size / --save-bandwidth",
    )
    s.add_argument(
        "--chunk-size",
        type=byte_size,
        default=VfConfig().chunk_size,
        help="the most one SAVE writes (a chunked migration's piece)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the VFs' contents and workload")
    s.add_argument(
        "--shard",
        type=shard_number,
        metavar="K|auto",
        help="serve as shard K of a sharded firmware (auto: K from the hostname's trailing "
        "-K, as a StatefulSet's pods); its VFs get seed --seed + K so shards differ",
    )
    s.add_argument(
        "--clock",
        choices=["real", "virtual"],
        default="real",
        help="virtual: time moves only through the AdvanceClock RPC",
    )
    add_loop_flag(s)
    s.add_argument("--shm-dir", default=None, help="where drivers' shared memory lives")
    s.add_argument(
        "--memory-limit",
        type=memory_limit_arg,
        default=None,
        metavar="BYTES",
        help="VF state and firmware-held host memory together; beyond it CreateVfs, "
        "Reconfigure, CreateMkey and LOAD are refused with NO_MEMORY (default: 3/4 of the "
        "machine's memory or its cgroup's limit; at most that memory)",
    )
    s.add_argument(
        "--max-remote-memory",
        type=byte_size_between(0, MAX_REMOTE_MEMORY),
        default=DEFAULT_MAX_REMOTE_BYTES,
        metavar="BYTES",
        help="limit on memory held for drivers on other hosts (their mkeys' buffers); 0: "
        "none (their CreateMkey is LIM_ERR / NO_MEMORY) (default 8GiB; at most 1TiB)",
    )
    s.add_argument(
        "--mkeys-per-client",
        type=count_between(1, MAX_MKEYS_SETTING),
        default=MAX_MKEYS_PER_CLIENT,
        metavar="N",
        help=f"mkeys one client may hold; beyond, CreateMkey is LIM_ERR / TOO_MANY_MKEYS "
        f"(default {MAX_MKEYS_PER_CLIENT}; at most {MAX_MKEYS_SETTING})",
    )
    s.add_argument(
        "--client-idle",
        type=seconds_between(0.0, MAX_CLIENT_IDLE),
        default=DEFAULT_IDLE_S,
        metavar="SECONDS",
        help="a client with no Completions stream that sent no RPC for SECONDS loses its "
        f"mkeys (default {DEFAULT_IDLE_S:g}; at most {MAX_CLIENT_IDLE:g})",
    )
    add_role_args(s, drivers=True)
    add_log_flags(s)
    add_metrics_flags(s, per="vf")

    d = sub.add_parser(
        "demo",
        help="migrate a VF by hand at the firmware level and compare digests",
        description="Save a VF with a live workload (full image, a reconfiguration that makes "
        "the firmware report INIT, incremental images, suspend, final image), load the images "
        "into a second VF and print both digests.",
    )
    d.add_argument(
        "--firmware", metavar="HOST:PORT", help="use a running fwemu instead of the embedded model"
    )
    d.add_argument("--size", type=byte_size, default=64 * MiB, help="state per VF")
    d.add_argument(
        "--dirty-rate",
        type=byte_size,
        default=32 * MiB,
        metavar="BYTES_PER_S",
        help="workload dirtying rate while the VF runs",
    )
    d.add_argument("--seed", type=int, default=1, help="seed of the VFs' contents and workload")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    add_client_args(d)  # TLS to --firmware (else $VFIO_TLS_CA/CERT/KEY)
    add_loop_flag(d)
    return p


def _firmware_server(
    args: argparse.Namespace, fw: Firmware, registry: CollectorRegistry | None
) -> FirmwareServer:
    """The firmware service over `fw`, from the parsed options."""
    from .service.server import FirmwareServer

    return FirmwareServer(
        fw,
        shm_dir=args.shm_dir,
        max_remote_bytes=args.max_remote_memory,
        metrics=registry,
        per_vf_limit=args.metrics_per_vf,
        max_mkeys_per_client=args.mkeys_per_client,
        client_idle=args.client_idle,
        roles=roles(args),
    )


async def _serve(args: argparse.Namespace) -> int:
    from .model.clock import LoopClock, VirtualClock
    from .model.memory import OutOfMemory
    from .scenario import build_firmware

    clock = VirtualClock() if args.clock == "virtual" else LoopClock()
    defaults = VfConfig(
        size=args.size,
        dirty_bytes_per_s=args.dirty_rate,
        save_bandwidth=args.save_bandwidth,
        save_latency_s=args.save_latency,
        chunk_size=args.chunk_size,
    )
    shard: int | None = args.shard
    fw = build_firmware(
        clock, defaults, seed=args.seed, scenario=args.scenario, vfs=args.vfs,
        seed_offset=shard or 0,
    )  # fmt: skip
    if args.memory_limit is not None:
        try:
            fw.memory.set_limit(args.memory_limit)
        except (OutOfMemory, ValueError) as e:
            raise ScenarioError(f"--memory-limit: {e}") from None
    if shard is not None:
        log.info("fwemu shard %d: VF seed %d (the seed in force + %d)", shard, fw.seed, shard)
    registry = CollectorRegistry() if args.metrics_listen else None
    server = _firmware_server(args, fw, registry)
    stop = stop_on_signals(log, GRACE_S)
    with serve_metrics(args.metrics_listen, registry, "fwemu") as metrics_port:
        port = await server.start(args.listen, **listen_options(args))
        # Set up: out of the full collections' way (grpcsvc.heap).
        if getattr(args, "own_process", False):
            frozen = freeze_startup_heap()
            log.debug("%d start-up objects frozen out of full GC collections", frozen)
        address = served_address(args.listen, port)
        announce(
            log,
            f"fwemu: serving {len(fw.vfs)} VFs on {address}",
            "fwemu serving %d VFs on %s (clock %s)",
            len(fw.vfs),
            address,
            args.clock,
        )
        announce_metrics(args.metrics_listen, metrics_port, "fwemu")
        await server.serve_until(stop, GRACE_S)
    log.info("fwemu stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # The program itself (its command line), not a caller in its own process
    # (a test): only then is the process's heap ours to freeze.
    args.own_process = argv is None
    if getattr(args, "shard", None) == "auto":
        try:
            args.shard = shard_from_hostname(socket.gethostname())
        except ValueError as e:
            parser.error(str(e))
    loop: LoopName = args.loop
    if args.command == "serve":
        return_large_buffers_to_the_os()
        setup_logging(args.log_level, args.log_format)
        main = _serve(args)
    else:
        main = run_demo(args)
    failed = (ListenError, LinkError, DemoError, TlsError)
    return run_main("fwemu", main, {ScenarioError: 2, failed: 1}, loop)


if __name__ == "__main__":
    sys.exit(main())

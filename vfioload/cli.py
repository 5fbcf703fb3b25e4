"""vfio-loadtest: Locust with the REINIT load test's user classes.

    vfio-loadtest --driver 127.0.0.1:50052 --mix reinit-loop:4,faults:1 \\
        --headless -u 8 -r 8 -t 60s --csv run

Our options are read here; everything else is Locust's own and goes to it
unchanged (--headless -u -r -t --csv --html --master --worker --master-host
...).  A distributed run starts `vfio-loadtest --master ...` once and
`vfio-loadtest --worker --master-host HOST ...` per worker, each with the
same --driver, --scenario and TLS options.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY, add_client_args
from grpcsvc.units import byte_size_between

from .mix import CLASS_NAMES, DEFAULT_MIX, parse_mix

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MIN_VF, MAX_VF = 64 << 10, 1 << 30
MAX_SHARDS = 1 << 16  # PCI domains
MIN_RECONFIG, MAX_RECONFIG, DEFAULT_RECONFIG = 4 << 10, 64 << 20, 64 << 10


def _shard(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= k < MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"{k} is not a PCI domain (0 to {MAX_SHARDS - 1})")
    return k


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vfio-loadtest",
        add_help=False,
        description="Load tests of the VFIO REINIT paths on Locust. Options not listed here "
        "are Locust's own and pass through (see --locust-help).",
    )
    p.add_argument("-h", "--help", action="store_true", help="this help")
    p.add_argument("--locust-help", action="store_true", help="Locust's own options")
    p.add_argument(
        "--driver",
        default=os.environ.get("VFIO_DRIVER", "127.0.0.1:50052"),
        metavar="HOST:PORT",
        help="the vfio-driver service (default $VFIO_DRIVER or 127.0.0.1:50052)",
    )
    p.add_argument(
        "--scenario",
        metavar="HOST:PORT",
        help="the Scenario service of --driver's firmware: fwemu serve, or the driver's own "
        "(vfio-driver serve --scenario-service; the default: --driver)",
    )
    p.add_argument(
        "--mix",
        default=DEFAULT_MIX,
        metavar="CLASS:WEIGHT,...",
        help=f"user classes and weights, of {', '.join(CLASS_NAMES)} (default {DEFAULT_MIX})",
    )
    p.add_argument(
        "--vf-size",
        type=byte_size_between(MIN_VF, MAX_VF),
        default=1 << 20,
        metavar="BYTES",
        help="state size of the VFs the users lease (made through Scenario; default 1MiB)",
    )
    p.add_argument(
        "--reconfig-bytes",
        type=byte_size_between(MIN_RECONFIG, MAX_RECONFIG),
        default=DEFAULT_RECONFIG,
        metavar="BYTES",
        help="what one reconfiguration of those VFs replaces (default 64KiB): the new initial "
        "data each REINIT announces",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=0,
        metavar="K",
        help="which of the driver's firmware shards --scenario is (its devices' PCI domain; "
        "default 0)",
    )
    add_client_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.help:
        parser.print_help()
        return
    try:
        import locust.main
    except ImportError:
        parser.exit(2, "vfio-loadtest: Locust is not installed: pip install locust\n")
    if args.locust_help:
        sys.argv = ["vfio-loadtest", "--help"]
        locust.main.main()
        return
    try:
        mix = parse_mix(args.mix)
    except ValueError as e:
        parser.exit(2, f"vfio-loadtest: {e}\n")
    os.environ["VFIO_LOADTEST_DRIVER"] = args.driver
    os.environ["VFIO_LOADTEST_SCENARIO"] = args.scenario or args.driver
    os.environ["VFIO_LOADTEST_MIX"] = args.mix
    os.environ["VFIO_LOADTEST_VF_SIZE"] = str(args.vf_size)
    os.environ["VFIO_LOADTEST_RECONFIG_BYTES"] = str(args.reconfig_bytes)
    os.environ["VFIO_LOADTEST_SHARD"] = str(args.shard)
    for env, value in ((ENV_CA, args.tls_ca), (ENV_CERT, args.tls_cert), (ENV_KEY, args.tls_key)):
        if value:
            os.environ[env] = value
    # The classes of the mix, by name: Locust runs those (weights: the locustfile's).
    sys.argv = ["vfio-loadtest", "-f", str(LOCUSTFILE), *rest, *(CLASS_NAMES[k] for k in mix)]
    locust.main.main()


if __name__ == "__main__":
    main()

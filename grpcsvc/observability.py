"""The metrics options every service takes, and its /metrics endpoint's life."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

from prometheus_client import CollectorRegistry

from .logs import announce
from .metrics import start_metrics_http

log = logging.getLogger("grpcsvc")

PER_LIMIT_MAX = 256  # per-VF / per-device series at most


def _per_limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= PER_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0..{PER_LIMIT_MAX}")
    return n


def add_metrics_flags(p: argparse.ArgumentParser, *, per: Literal["vf", "device"]) -> None:
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: no metrics)",
    )
    p.add_argument(
        f"--metrics-per-{per}",
        type=_per_limit,
        default=0,
        metavar="N",
        help=f"also export per-{per.upper() if per == 'vf' else per} series for the first N "
        f"(0..{PER_LIMIT_MAX}; default 0: label sets stay bounded)",
    )


@contextlib.contextmanager
def serve_metrics(
    listen: str | None, registry: CollectorRegistry | None, service: str
) -> Iterator[int | None]:
    """Serve `registry` at `listen` for the duration; yields the port (None: off).
    A taken or malformed address raises ListenError.  Enter it before the gRPC
    server starts, so a bad address fails the service before it announces itself."""
    if not listen or registry is None:
        yield None
        return
    endpoint = start_metrics_http(listen, registry)
    try:
        yield endpoint.port
    finally:
        endpoint.stop()


def announce_metrics(listen: str | None, port: int | None, service: str) -> None:
    """The line after "serving ...": where the metrics are (nothing when off),
    on stdout and in the log (grpcsvc.logs.announce)."""
    if listen and port is not None:
        host = listen.rpartition(":")[0]
        announce(log, f"{service}: metrics on http://{host}:{port}/metrics")

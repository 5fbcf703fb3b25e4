"""A grpc.aio server with what every service of this project registers: the
health service, server reflection, a clear error when the address is taken,
and a graceful stop on SIGTERM/SIGINT; and the `serve` command that runs one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE

from . import reflection, tls
from .generic import GenericHandlersOnly
from .looplag import LoopLag
from .options import CHANNEL_OPTIONS


def add_serve_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    help: str,
    description: str,
    listen: str,
) -> argparse.ArgumentParser:
    """A service's `serve` command, its first option --listen (default `listen`)."""
    s = sub.add_parser("serve", help=help, description=description)
    s.add_argument(
        "--listen",
        default=listen,
        metavar="HOST:PORT",
        help=f"where to serve: HOST:PORT or unix:PATH (default {listen}); off-host "
        "only with TLS or --insecure",
    )
    tls.add_server_args(s)
    return s


class ListenError(RuntimeError):
    """The server cannot listen where it was asked to."""


def listen_options(args: argparse.Namespace) -> dict[str, Any]:
    """GrpcService.start's keyword options from the serve command's TLS
    options (ListenError if they cannot work)."""
    try:
        config = tls.server_tls(args)
    except tls.TlsError as e:
        raise ListenError(str(e)) from None
    return {"tls_config": config, "insecure": args.insecure, "socket_mode": args.socket_mode}


def served_address(listen: str, port: int) -> str:
    """What a service announces it serves on: HOST:PORT with the bound port,
    or the unix:PATH it was given."""
    if tls.unix_path(listen) is not None:
        return listen
    return f"{listen.rpartition(':')[0]}:{port}"


def split_host_port(listen: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; ("unix:PATH", 0) of a unix socket address."""
    if tls.unix_path(listen) is not None:
        return listen, 0
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class GrpcService:
    """Owns a grpc.aio server; `register` adds the project's servicers."""

    def __init__(
        self,
        service_names: Sequence[str],
        register: Callable[[grpc.aio.Server], None],
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor[object, object]] = (),
        maximum_concurrent_rpcs: int | None = None,
        loop_lag: LoopLag | None = None,
    ) -> None:
        """`loop_lag`: measured from start() to stop() (grpcsvc.looplag)."""
        self.service_names = list(service_names)
        self.loop_lag = loop_lag
        # SO_REUSEPORT off: a second server on a taken port must fail, not share it.
        self.server = grpc.aio.server(
            interceptors=list(interceptors),
            options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        )
        register(self.server)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        # Health as generic handlers (reflection's are too): no per-call cost
        # to the other services (GenericHandlersOnly).
        generic: Any = GenericHandlersOnly(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic)
        reflection.enable_server_reflection([*self.service_names, HEALTH_SERVICE], self.server)
        self.port = 0
        self._stopped = asyncio.Event()

    async def start(
        self,
        listen: str,
        *,
        tls_config: tls.ServerTls | None = None,
        insecure: bool = False,
        socket_mode: int = tls.DEFAULT_SOCKET_MODE,
    ) -> int:
        """Bind and start; returns the port (useful with port 0; for a unix
        socket, created with `socket_mode`, gRPC answers 1).  Off-host only
        with TLS or `insecure` (ListenError)."""
        split_host_port(listen)
        path = tls.unix_path(listen)
        try:
            tls.check_listen(listen, tls_config, insecure)
            if path is not None:
                tls.prepare_unix_socket(path)
            creds = tls_config.credentials() if tls_config is not None else None
        except (tls.TlsError, OSError) as e:
            raise ListenError(f"cannot listen on {listen}: {e}") from None
        if path is None:
            # Before gRPC tries: its core would print its own raw line first.
            check_port_free(listen)
        # A unix socket is created with the mode asked for, never wider for a moment.
        umask = os.umask(0o777 & ~socket_mode) if path is not None else None
        try:
            if creds is not None:
                port = self.server.add_secure_port(listen, creds)
            else:
                port = self.server.add_insecure_port(listen)
        except RuntimeError as e:
            raise ListenError(f"cannot listen on {listen}: {_why(e)}") from None
        finally:
            if umask is not None:
                os.umask(umask)
        if port == 0 and path is None:
            raise ListenError(f"cannot listen on {listen}: address in use or not available")
        if path is not None:
            try:
                os.chmod(path, socket_mode)
            except OSError as e:
                raise ListenError(f"cannot set the mode of {path}: {e.strerror}") from None
        await self.server.start()
        if self.loop_lag is not None:
            self.loop_lag.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.port = port
        return port

    async def set_serving(self, name: str, serving: bool) -> None:
        """Report `name` SERVING or NOT_SERVING (what it depends on went away);
        after stop() it stays NOT_SERVING."""
        status = health_pb2.HealthCheckResponse
        await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let calls in progress finish for `grace` seconds, stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.loop_lag is not None:
            await self.loop_lag.stop()

    async def serve_until(
        self,
        stop: asyncio.Event,
        grace: float = 5.0,
        *,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """Serve until `stop` is set (see stop_on_signals) or the server ends.
        `on_stop` runs once `stop` is set, before the graceful stop: it ends the
        service's long-lived streams, which the grace would otherwise wait for."""
        waiter = asyncio.ensure_future(self.server.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if on_stop is not None and stop.is_set():
            on_stop()
        await self.stop(grace)
        waiter.cancel()


def stop_on_signals(log: logging.Logger | None = None, grace: float = 5.0) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT.  Install it before telling anyone the
    service is up, so that a signal sent right away still stops it cleanly.
    With `log`, the first signal is logged (info): received, draining the
    calls in progress for up to `grace` seconds (serve_until's), stopping."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def received(sig: signal.Signals) -> None:
        if log is not None and not stop.is_set():
            log.info(
                "received %s: draining calls in progress (up to %g s), then stopping",
                sig.name,
                grace,
            )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, received, sig)
    return stop


def check_port_free(listen: str) -> None:
    """ListenError (EADDRINUSE) if a socket already listens on HOST:PORT's
    port: bound as gRPC binds (SO_REUSEADDR), on each address HOST names.
    Port 0, and addresses this host cannot bind, are left to gRPC."""
    host, port = split_host_port(listen)
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        return  # gRPC names what is wrong with HOST
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"cannot listen on {listen}: EADDRINUSE: address already in use "
                    "(another process serves that port)"
                ) from None


def _why(e: RuntimeError) -> str:
    text = str(e)
    if "in use" in text.lower() or "bind" in text.lower():
        return "address already in use (or not available on this host)"
    return text

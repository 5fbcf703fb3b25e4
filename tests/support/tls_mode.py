"""The suite's two transport modes (issue 12: "All the existing tests still
pass, in both insecure-loopback and mTLS modes").

By default every server the harness starts listens in plaintext on loopback
and every caller is the one principal `anonymous`.  With VFIO_TEST_TLS=1 the
same servers require mutual TLS, with the session's development PKI
(tests/support/tls.py): in-process servers get `tls_config` and the PKI's
roles, spawned `fwemu serve` / `vfio-driver serve` get `--tls-*`, a driver's
firmware link presents the driver's certificate (`--firmware-tls-*`, or
`link_tls()` in process), and the clients the harness makes present the
admin's (ADMIN), so that Scenario calls that create VFs work.  The VFIO_TLS_*
variables name the admin's certificate for the session too (tests/conftest.py),
so library clients and `vfioctl` subprocesses use it without being told.

A client made by the harness uses TLS only towards a server the harness
started in that mode (`client_tls(target)`): a test that starts a plaintext
server of its own still reaches it with the harness's clients.  The firmware
link the harness gives a driver is tests/support/harness_link.py's.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from grpcsvc import spawn
from grpcsvc.access import Roles
from grpcsvc.tls import ANONYMOUS, ENV_CA, ENV_CERT, ENV_KEY, ClientTls, ServerTls, aio_channel
from tests.support.tls import ADMIN, DRIVER, Pki, make_pki

ENV = "VFIO_TEST_TLS"

# Targets ("127.0.0.1:PORT") of the servers the harness serves with mutual TLS now.
_TLS_TARGETS: set[str] = set()


def enabled() -> bool:
    """Whether this run is the mTLS pass (VFIO_TEST_TLS set, and not to 0)."""
    return os.environ.get(ENV, "") not in ("", "0")


@functools.cache
def session_pki() -> Pki:
    """The session's PKI (CA, server, DRIVER, the tenants, ADMIN), made once on
    first use in a temporary directory removed at exit.  The `pki` fixture is
    this one, so both modes and every test share one CA."""
    directory = Path(tempfile.mkdtemp(prefix="vfio-test-pki-"))
    atexit.register(shutil.rmtree, directory, True)
    return make_pki(directory)


def client_principal() -> str:
    """The principal the services see for the harness's clients."""
    return session_pki().principal(ADMIN) if enabled() else ANONYMOUS


# --- servers -------------------------------------------------------------------------


def server_tls() -> ServerTls | None:
    """An in-process server's tls_config: mutual TLS in the mTLS pass."""
    return session_pki().server_tls() if enabled() else None


def roles() -> Roles | None:
    """An in-process server's roles (None: the default, everyone anonymous)."""
    return session_pki().roles() if enabled() else None


def server_args() -> list[str]:
    """A spawned `serve` command's TLS and role options (none in plaintext)."""
    return session_pki().server_args() if enabled() else []


def firmware_link_args() -> list[str]:
    """`vfio-driver serve --firmware`'s link options: the driver's certificate."""
    return session_pki().client_args(DRIVER, prefix="firmware-tls") if enabled() else []


async def start(server: Any, listen: str = "127.0.0.1:0") -> str:
    """Start an in-process FirmwareServer or DriverServer on `listen` in this
    run's mode; its target, known to `client_tls` while it serves."""
    port = await server.start(listen, tls_config=server_tls())
    return serving(f"127.0.0.1:{port}")


def serving(target: str) -> str:
    """Note that the harness serves `target` in this run's mode (spawned
    servers: the address they announced); returns it."""
    if enabled():
        _TLS_TARGETS.add(target)
    return target


def stopped(target: str) -> None:
    """`target` no longer serves (its port may serve a plaintext server next)."""
    _TLS_TARGETS.discard(target)


@contextlib.contextmanager
def served(command: Sequence[str], *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """grpcsvc.spawn.served in this run's mode: (process, HOST:PORT)."""
    with spawn.served(command, *args, *server_args()) as (proc, target):
        try:
            yield proc, serving(target)
        finally:
            stopped(target)


# --- clients -------------------------------------------------------------------------


def client_tls(target: str, name: str = ADMIN) -> ClientTls | None:
    """What a harness client of `target` presents: `name`'s certificate when
    the harness serves `target` with mutual TLS, else nothing (plaintext)."""
    return session_pki().client_tls(name) if target in _TLS_TARGETS else None


def channel(target: str, **kw: Any) -> grpc.aio.Channel:
    """A raw grpc.aio channel to `target` as the harness's clients reach it
    (health probes, raw stubs); `kw`: aio_channel's options."""
    return aio_channel(target, client_tls(target), **kw)


def link_tls(target: str) -> ClientTls | None:
    """A driver's firmware link to `target`: the driver's certificate."""
    return client_tls(target, DRIVER)


def client_environment() -> dict[str, str | None]:
    """VFIO_TLS_CA/CERT/KEY for the session (None: unset): the admin's
    certificate in the mTLS pass, none otherwise (whatever the shell had)."""
    if not enabled():
        return {ENV_CA: None, ENV_CERT: None, ENV_KEY: None}
    pki = session_pki()
    admin = pki.clients[ADMIN]
    return {ENV_CA: str(pki.ca), ENV_CERT: str(admin.cert), ENV_KEY: str(admin.key)}

"""certs: a development CA and certificates for mutual TLS (grpcsvc.certs)."""

from __future__ import annotations

import argparse
import errno
import re
from pathlib import Path
from typing import Any

from grpcsvc.access import DEFAULT_DRIVER_PRINCIPAL
from grpcsvc.certs import CA_CERT, CA_KEY, DEFAULT_DAYS, LOCAL_NAMES, DevCa, Issued, spiffe_id
from grpcsvc.tls import ENV_CA, ENV_CERT, ENV_KEY
from grpcsvc.units import count_between

from .command import LocalCommand
from .output import CliError, Out

MAX_DAYS = 36_500  # a hundred years: later dates overflow X.509's UTCTime/GeneralizedTime use

SERVER = "server"
# The driver's (its firmware link's), an orchestrator's, an administrator's.
DEFAULT_CLIENTS = (DEFAULT_DRIVER_PRINCIPAL, "vfioctl", "admin")
_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"(\*\.)?[A-Za-z0-9:][A-Za-z0-9.:_-]{0,252}")  # DNS (maybe *.), IPv4, IPv6


def principal(name: str) -> str:
    """The principal the services see for client certificate `name`: the
    driver's has a CN only (fwemu's default --driver-principals), the others
    a SPIFFE URI SAN."""
    return name if name == DEFAULT_DRIVER_PRINCIPAL else spiffe_id(name)


def _client_name(text: str) -> str:
    if not _STEM.fullmatch(text) or text in (SERVER, "ca"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a client name (letters, digits, '.', '_', '-'; not "
            f"{SERVER!r} or 'ca')"
        )
    return text


def _host(text: str) -> str:
    name = text.strip("[]")
    if not _HOST.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or address")
    return name


def _ca(directory: Path, force: bool, keep: bool, days: int) -> tuple[DevCa, bool]:
    """The CA to issue from, and whether it is new."""
    existing = [p for p in (directory / CA_CERT, directory / CA_KEY) if p.exists()]
    if existing and keep:
        try:
            return DevCa.load(directory, days=days), False
        except (OSError, ValueError) as e:
            raise CliError(
                errno.EINVAL, f"cannot use the CA in {directory}: {e}", "--force makes a new one"
            ) from None
    if existing and not force:
        raise CliError(
            errno.EEXIST,
            f"{existing[0]} exists: refusing to replace the CA",
            "--keep-ca issues the certificates from it; --force replaces it (whatever it "
            "signed is no longer trusted)",
        )
    return DevCa(directory, days=days), True


def _files(issued: Issued) -> dict[str, str]:
    return {"cert": str(issued.cert), "key": str(issued.key)}


async def cmd_certs(args: argparse.Namespace, out: Out) -> None:
    """write a development CA and certificates for mutual TLS

    Write into DIR a development CA (ca.pem, ca.key), a server certificate
    (server.pem, server.key) for every --server-host and localhost, 127.0.0.1
    and ::1, and a client certificate NAME.pem/NAME.key for every --client
    (default: vfio-driver, vfioctl, admin). The principal of client vfio-driver
    is its CN, "vfio-driver" (what `fwemu serve --driver-principals` expects by
    default); every other client's is spiffe://vfio-mlx5-emu/NAME. Prints the
    files and the options that use them. Keys are written unencrypted (mode
    0600), the CA's beside the certificates: a test lab's PKI, not a
    production one. An existing CA is kept with --keep-ca (the certificates
    are issued anew from it), replaced with --force, else refused."""
    directory = Path(args.dir)
    hosts = list(dict.fromkeys([*args.server_host, *LOCAL_NAMES]))
    clients = list(dict.fromkeys(args.client or DEFAULT_CLIENTS))
    ca, created = _ca(directory, args.force, args.keep_ca, args.days)
    server = ca.server(SERVER, hosts)
    issued = {name: ca.client(name, uri=name != DEFAULT_DRIVER_PRINCIPAL) for name in clients}

    ca_file = str(ca.cert_path)
    admins = [principal(n) for n in clients if n == "admin"]
    server_flags = [
        "--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-client-ca", ca_file,
    ]  # fmt: skip
    fwemu_flags = ["--driver-principals", DEFAULT_DRIVER_PRINCIPAL]
    if admins:
        fwemu_flags += ["--admin-principals", ",".join(admins)]
    flags: dict[str, list[str]] = {"server": server_flags, "fwemu": fwemu_flags}
    if DEFAULT_DRIVER_PRINCIPAL in issued:
        d = issued[DEFAULT_DRIVER_PRINCIPAL]
        flags["driver_firmware_link"] = [
            "--firmware-tls-ca", ca_file,
            "--firmware-tls-cert", str(d.cert), "--firmware-tls-key", str(d.key),
        ]  # fmt: skip
    client = next((n for n in clients if n != DEFAULT_DRIVER_PRINCIPAL), None)
    if client is not None:
        c = issued[client]
        flags["client"] = [
            "--tls-ca", ca_file, "--tls-cert", str(c.cert), "--tls-key", str(c.key),
        ]  # fmt: skip
    doc: dict[str, Any] = {
        "dir": str(directory),
        "ca": {"cert": ca_file, "key": str(directory / CA_KEY), "created": created},
        "server": {**_files(server), "hosts": hosts},
        "clients": {n: {**_files(i), "principal": principal(n)} for n, i in issued.items()},
        "flags": flags,
    }
    out.doc(doc)
    out.line(f"{directory}:")
    out.line(f"  {CA_CERT}, {CA_KEY}: the CA ({'new' if created else 'kept'})")
    out.line(f"  {server.cert.name}, {server.key.name}: server certificate for {', '.join(hosts)}")
    for n, i in issued.items():
        out.line(f"  {i.cert.name}, {i.key.name}: client certificate, principal {principal(n)}")
    out.line("servers (fwemu serve, vfio-driver serve):")
    out.line(f"  {' '.join(server_flags)}")
    out.line(f"  fwemu also: {' '.join(fwemu_flags)}")
    if "driver_firmware_link" in flags:
        out.line("the driver's firmware link (vfio-driver serve):")
        out.line(f"  {' '.join(flags['driver_firmware_link'])}")
    if client is not None:
        c = issued[client]
        out.line(f"clients (vfioctl, the library) as {principal(client)}:")
        out.line(f"  {' '.join(flags['client'])}")
        out.line(f"  or {ENV_CA}={ca_file} {ENV_CERT}={c.cert} {ENV_KEY}={c.key}")


def _arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", metavar="DIR", help="where to write (created if missing)")
    s.add_argument(
        "--server-host",
        type=_host,
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address clients dial the services by; repeatable (localhost, "
        "127.0.0.1 and ::1 are always included; a DNS name may start with '*.')",
    )
    s.add_argument(
        "--client",
        type=_client_name,
        action="append",
        metavar="NAME",
        help="a client certificate to write; repeatable (default: "
        + ", ".join(DEFAULT_CLIENTS)
        + ")",
    )
    s.add_argument(
        "--days",
        type=count_between(1, MAX_DAYS),
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"validity of new certificates (default {DEFAULT_DAYS}; 1 to {MAX_DAYS})",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="replace an existing CA")
    g.add_argument(
        "--keep-ca",
        action="store_true",
        help="issue the certificates from the CA already in DIR (made if missing)",
    )


CERTS = LocalCommand(cmd_certs, _arguments)

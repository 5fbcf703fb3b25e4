"""Transport security for every listener and channel of the project (README,
"Security"): TLS and mutual TLS, `unix:PATH` listeners, the rule that a
server listens off-host only with TLS, and the caller's principal.

The interface is fixed (deploy files and scripts rely on it):
- servers: `--tls-cert FILE --tls-key FILE`, `--tls-client-ca FILE` to require
  client certificates, `--insecure` to listen off-host without TLS anyway,
  `--socket-mode` for a `unix:PATH` listener;
- clients: `--tls-ca/--tls-cert/--tls-key`, else the environment variables
  VFIO_TLS_CA, VFIO_TLS_CERT, VFIO_TLS_KEY;
- the driver's firmware link: `--firmware-tls-ca/--firmware-tls-cert/--firmware-tls-key`.

The principal of a call is its client certificate's identity: the first URI
SAN (a SPIFFE id, say), else the subject's CN.  Without a client certificate
(no TLS, or TLS without --tls-client-ca) every caller is the one principal
ANONYMOUS: on loopback or a unix socket whose file mode admits only trusted
users, that is the trust boundary.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

ENV_CA, ENV_CERT, ENV_KEY = "VFIO_TLS_CA", "VFIO_TLS_CERT", "VFIO_TLS_KEY"
ANONYMOUS = "anonymous"  # the one principal of callers without a client certificate
MAX_PEM = 1 << 20  # a certificate, key or CA bundle file is small
DEFAULT_SOCKET_MODE = 0o600


class TlsError(ValueError):
    """TLS settings that cannot work (a missing file, a cert without its key)."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as e:
        raise TlsError(f"cannot read the {what} {path}: {e.strerror}") from None
    if len(data) > MAX_PEM:
        raise TlsError(f"the {what} {path} is larger than {MAX_PEM} bytes: not a PEM file")
    if b"-----BEGIN" not in data:
        raise TlsError(f"the {what} {path} is not PEM")
    return data


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A server's certificate and key; `client_ca` requires client certificates
    signed by it (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What a client trusts (`ca`; None: the system's roots) and, for mutual
    TLS, its own certificate and key."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            _read(self.ca, "TLS CA") if self.ca else None,
            _read(self.key, "TLS key") if self.key else None,
            _read(self.cert, "TLS certificate") if self.cert else None,
        )


def client_tls(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    *,
    env: Mapping[str, str] | None = os.environ,
) -> ClientTls | None:
    """A client's TLS from its options, each else from the environment
    (VFIO_TLS_CA/CERT/KEY; `env=None` reads none); None: plaintext."""
    if env is not None:
        ca = ca or env.get(ENV_CA) or None
        cert = cert or env.get(ENV_CERT) or None
        key = key or env.get(ENV_KEY) or None
    if ca is None and cert is None and key is None:
        return None
    return ClientTls(ca, cert, key)


def aio_channel(
    target: str,
    tls: ClientTls | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`, over TLS when `tls` is given."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=list(options), interceptors=interceptors
    )


def sync_channel(
    target: str, tls: ClientTls | None, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A sync-stack channel (probes, gevent users), over TLS when `tls` is given."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=list(options))


# --- listen addresses ------------------------------------------------------------------


def unix_path(listen: str) -> str | None:
    """The socket path of a `unix:PATH` address (unix:///abs too), else None."""
    if listen.startswith("unix://"):
        return listen[len("unix://") :]
    if listen.startswith("unix:"):
        return listen[len("unix:") :]
    return None


def is_local(listen: str) -> bool:
    """A unix socket or a loopback address: reachable from this host only."""
    if unix_path(listen) is not None or listen.startswith("unix-abstract:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, tls: ServerTls | None, insecure: bool) -> None:
    """Refuse (TlsError) to listen off-host without TLS unless `insecure`."""
    if tls is None and not insecure and not is_local(listen):
        raise TlsError(
            f"refusing to listen on {listen} without TLS: give --tls-cert and --tls-key "
            "(and --tls-client-ca for client certificates), listen on loopback or a "
            "unix:PATH socket, or pass --insecure"
        )


def prepare_unix_socket(path: str) -> None:
    """Make room for a unix socket at `path`: a stale socket is removed, any
    other file is refused (TlsError) rather than replaced."""
    if not path:
        raise TlsError("unix: needs a path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TlsError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


# --- the caller ------------------------------------------------------------------------


def principal(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The authenticated identity of the caller: its certificate's first URI
    SAN, else its CN; ANONYMOUS without a client certificate."""
    auth = context.auth_context()
    for key in ("peer_uri", "x509_common_name"):
        for value in auth.get(key) or ():
            return str(value.decode("utf-8", "replace"))
    return ANONYMOUS


def principals(text: str) -> frozenset[str]:
    """A comma-separated list of principals (argparse type)."""
    return frozenset(p.strip() for p in text.split(",") if p.strip())


# --- command-line options --------------------------------------------------------------


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """--tls-cert, --tls-key, --tls-client-ca, --insecure, --socket-mode."""
    g = parser.add_argument_group("transport security (README, Security)")
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    g.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA (mutual TLS); the principal "
        "of a call is its certificate's URI SAN, else its CN",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="listen without TLS on an address that is not loopback or unix:PATH",
    )
    g.add_argument(
        "--socket-mode",
        type=_mode,
        default=DEFAULT_SOCKET_MODE,
        metavar="OCTAL",
        help="file mode of a unix:PATH listener, the trust boundary for local clients "
        "(default 0600)",
    )


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The ServerTls of add_server_args' options (TlsError if incomplete)."""
    cert, key, ca = args.tls_cert, args.tls_key, args.tls_client_ca
    if cert is None and key is None:
        if ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise TlsError("--tls-cert and --tls-key go together")
    tls = ServerTls(cert, key, ca)
    tls.credentials()  # every file readable and PEM, before anything listens
    return tls


def add_client_args(parser: argparse.ArgumentParser, prefix: str = "tls") -> None:
    """--PREFIX-ca, --PREFIX-cert, --PREFIX-key (default prefix: tls)."""
    env = prefix == "tls"
    parser.add_argument(
        f"--{prefix}-ca",
        metavar="FILE",
        help="CA to verify the server with" + (f" (default ${ENV_CA})" if env else ""),
    )
    parser.add_argument(
        f"--{prefix}-cert",
        metavar="FILE",
        help="client certificate, for mutual TLS" + (f" (default ${ENV_CERT})" if env else ""),
    )
    parser.add_argument(
        f"--{prefix}-key",
        metavar="FILE",
        help="the client certificate's key" + (f" (default ${ENV_KEY})" if env else ""),
    )


def client_tls_from_args(args: argparse.Namespace, prefix: str = "tls") -> ClientTls | None:
    """The ClientTls of add_client_args' options; with the `tls` prefix the
    VFIO_TLS_* environment fills what the options leave out."""
    attr = prefix.replace("-", "_")
    return client_tls(
        getattr(args, f"{attr}_ca", None),
        getattr(args, f"{attr}_cert", None),
        getattr(args, f"{attr}_key", None),
        env=os.environ if prefix == "tls" else None,
    )


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 0660")
    return mode

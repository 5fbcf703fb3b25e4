"""How the clients reach a service: TLS given by the caller, or else from the
environment (VFIO_TLS_CA, VFIO_TLS_CERT, VFIO_TLS_KEY; grpcsvc.tls).

Every client takes `tls=`: a ClientTls, None for plaintext (a loopback or
unix:PATH service without TLS), or FROM_ENV (the default) to read the
environment, so that a script, a container or a pod gives its certificate
once for every client it makes.
"""

from __future__ import annotations

import enum
from typing import Literal, TypeAlias

from grpcsvc.tls import ClientTls, client_tls


class _Environment(enum.Enum):
    FROM_ENV = "from the environment"


FROM_ENV = _Environment.FROM_ENV
TlsChoice: TypeAlias = ClientTls | Literal[_Environment.FROM_ENV] | None


def resolve_tls(tls: TlsChoice) -> ClientTls | None:
    """`tls` itself, or for FROM_ENV the VFIO_TLS_* variables' (None if unset)."""
    return client_tls() if tls is FROM_ENV else tls

"""A development PKI for tests of mutual TLS: one CA, a server certificate
for 127.0.0.1/localhost, client certificates for the principals the tests use
(grpcsvc.certs).  Made once per session (`pki` fixture in tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grpcsvc.access import DEFAULT_DRIVER_PRINCIPAL, Roles
from grpcsvc.certs import DevCa, Issued, spiffe_id
from grpcsvc.tls import ClientTls, ServerTls

# The principals tests use: the driver's own, two tenants, an admin, and a
# second driver (another lab's vfio-driver on the same firmware, for tests
# whose firmware names it in --driver-principals).
DRIVER = DEFAULT_DRIVER_PRINCIPAL
TENANTS = ("team-a", "team-b")
ADMIN = "lab-admin"
OTHER_DRIVER = "vfio-driver-b"


@dataclass
class Pki:
    dir: Path
    ca: Path
    server: Issued
    clients: dict[str, Issued] = field(default_factory=dict)

    def server_tls(self, *, mutual: bool = True) -> ServerTls:
        return ServerTls(
            str(self.server.cert), str(self.server.key), str(self.ca) if mutual else None
        )

    def client_tls(self, name: str | None = None) -> ClientTls:
        """TLS as principal `name` (None: server authentication only)."""
        if name is None:
            return ClientTls(str(self.ca))
        c = self.clients[name]
        return ClientTls(str(self.ca), str(c.cert), str(c.key))

    def principal(self, name: str) -> str:
        """The principal the services see for client certificate `name`."""
        return name if name in (DRIVER, OTHER_DRIVER) else spiffe_id(name)

    def roles(self) -> Roles:
        """The roles services of the tests run with: DRIVER drives, ADMIN administers."""
        return Roles(admins=frozenset({self.principal(ADMIN)}), drivers=frozenset({DRIVER}))

    def server_args(self) -> list[str]:
        """A serve command's options for mutual TLS with these roles."""
        return [
            "--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key),
            "--tls-client-ca", str(self.ca),
            "--admin-principals", self.principal(ADMIN),
        ]  # fmt: skip

    def client_args(self, name: str, prefix: str = "tls") -> list[str]:
        c = self.clients[name]
        return [
            f"--{prefix}-ca", str(self.ca),
            f"--{prefix}-cert", str(c.cert),
            f"--{prefix}-key", str(c.key),
        ]  # fmt: skip


def make_pki(directory: Path) -> Pki:
    ca = DevCa(directory)
    pki = Pki(directory, ca.cert_path, ca.server("server"))
    # The drivers' certificates have a CN only: their principal is their name.
    for name in (DRIVER, OTHER_DRIVER):
        pki.clients[name] = ca.client(name, uri=False)
    for name in (*TENANTS, ADMIN):
        pki.clients[name] = ca.client(name)
    return pki

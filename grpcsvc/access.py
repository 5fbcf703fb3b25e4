"""Who may do what (README, "Security"): the roles of principals, as
`--admin-principals` and `--driver-principals` name them.

Without client certificates every caller is tls.ANONYMOUS, which holds every
role: on loopback or a unix socket that is the trust boundary, as before TLS.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .tls import ANONYMOUS, principals

DEFAULT_DRIVER_PRINCIPAL = "vfio-driver"  # the name `vfioctl certs` gives the driver


@dataclass(frozen=True, slots=True)
class Roles:
    """Admins may do anything: the firmware's Firmware service, Scenario on
    any VF, every device's events.  Drivers may use the Firmware service (and
    say which principals hold which VF).  Everyone else reaches only what it
    holds."""

    admins: frozenset[str] = field(default_factory=frozenset)
    drivers: frozenset[str] = frozenset({DEFAULT_DRIVER_PRINCIPAL})

    def is_admin(self, principal: str) -> bool:
        return principal == ANONYMOUS or principal in self.admins

    def is_driver(self, principal: str) -> bool:
        return principal == ANONYMOUS or principal in self.drivers

    def may_use_firmware(self, principal: str) -> bool:
        """The Firmware service (commands, completions, mkeys)."""
        return self.is_driver(principal) or self.is_admin(principal)


def add_role_args(parser: argparse.ArgumentParser, *, drivers: bool) -> None:
    """--admin-principals (and, on the firmware, --driver-principals)."""
    parser.add_argument(
        "--admin-principals",
        type=principals,
        default=frozenset(),
        metavar="A,B",
        help="principals (client certificate URI SAN, else CN) that may see and "
        "control everything"
        + ("; the Firmware service and Scenario on any VF" if drivers else "")
        + " (default: none)",
    )
    if drivers:
        parser.add_argument(
            "--driver-principals",
            type=principals,
            default=frozenset({DEFAULT_DRIVER_PRINCIPAL}),
            metavar="A,B",
            help="principals of the vfio-drivers that use the Firmware service "
            f"(default {DEFAULT_DRIVER_PRINCIPAL})",
        )


def roles(args: argparse.Namespace) -> Roles:
    """The Roles of add_role_args' options."""
    return Roles(
        admins=args.admin_principals,
        drivers=getattr(args, "driver_principals", frozenset({DEFAULT_DRIVER_PRINCIPAL})),
    )

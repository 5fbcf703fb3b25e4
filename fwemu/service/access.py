"""Who may call what on the firmware (README, "The firmware service").

The Firmware service (commands, completions, mkeys, SetVfHolders) is for the
drivers and the admins (grpcsvc.access.Roles).  On the Scenario service an
admin reaches every VF; any other principal only the VFs whose device it holds
open, as its driver says (SetVfHolders): a VF it does not hold answers exactly
as one that does not exist, so the VFs of others are not even revealed.  What
changes the set of VFs or moves time is the admins' alone.

Without client certificates every caller is tls.ANONYMOUS, which holds every
role: loopback and unix sockets behave as before TLS.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from grpcsvc.access import Roles


class Reach(enum.Enum):
    """Who may call a Scenario RPC."""

    ANYONE = "anyone"
    HOLDER = "holder"  # admins, and the principals holding the request's VF
    ADMIN = "admin"


# Each Scenario RPC's reach, by method name (the servicer refuses to build
# without an entry for each of its RPCs).
SCENARIO_REACH: dict[str, Reach] = {
    "CreateVfs": Reach.ADMIN,
    "RemoveVf": Reach.ADMIN,
    "ApplyScenario": Reach.ADMIN,
    "AdvanceClock": Reach.ADMIN,
    "ConfigureVf": Reach.HOLDER,
    "GetVf": Reach.HOLDER,
    "Reconfigure": Reach.HOLDER,
    "ResetVf": Reach.HOLDER,  # as Reconfigure: what it undoes
    "InjectFault": Reach.HOLDER,
    "ClearFaults": Reach.HOLDER,
    "GetDigest": Reach.HOLDER,
    "ListVfs": Reach.ANYONE,  # lists only the VFs the caller reaches (drivers: all)
    "GetClock": Reach.ANYONE,
}


def reaches_vf(
    roles: Roles, holders: Mapping[int, frozenset[str]], principal: str, vhca_id: int
) -> bool:
    """Whether `principal` may use Scenario on VF `vhca_id`."""
    return roles.is_admin(principal) or principal in holders.get(vhca_id, frozenset())


def firmware_denied(principal: str) -> str:
    """Why a principal without the driver or admin role is refused the Firmware service."""
    return (
        f"principal {principal!r} may not use the Firmware service "
        "(only the drivers' and admins' principals: --driver-principals, --admin-principals)"
    )


def admin_only(rpc: str, principal: str) -> str:
    """Why a principal that is no admin is refused an admin-only Scenario RPC."""
    return f"{rpc} is for admins (--admin-principals); principal {principal!r} is none"

"""Who has a device open: the VFIO group's one opener (drivers/vfio/group.c).

vfio_group_fops_open() lets one file open a group at a time: a second opener
gets -EBUSY until the first releases it ("Do we need multiple instances of
the group open?  Seems not.").  Here every device is its own group and its
opener is a principal (grpcsvc.tls.principal): the device's fds of one
principal share the device as the fds of one process share an opened group,
and every other principal gets EBUSY until the last of them is closed.
Pure: the service says who opens and closes.
"""

from __future__ import annotations

import errno

from .errors import VfioError


class VfioGroup:
    """The opener of one device's group and how many of its device fds are open."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.opened_by: str | None = None
        self.users = 0

    def __repr__(self) -> str:
        return f"VfioGroup({self.name!r}, opened_by={self.opened_by!r}, users={self.users})"

    def get(self, principal: str) -> bool:
        """One more device fd of `principal`: EBUSY while another principal
        has the group open.  Whether this is the principal's first."""
        if self.opened_by is not None and self.opened_by != principal:
            raise VfioError(errno.EBUSY, f"{self.name} is open by another principal")
        first = self.users == 0
        self.opened_by = principal
        self.users += 1
        return first

    def put(self, principal: str) -> bool:
        """One device fd of `principal` closed: whether it was the last (the
        group is free again)."""
        if self.opened_by != principal or self.users == 0:
            raise ValueError(f"{self.name}: {principal!r} has no fd of it open")
        self.users -= 1
        if self.users == 0:
            self.opened_by = None
            return True
        return False

"""Errors of the VFIO layer are kernel errnos."""

from __future__ import annotations

import os

from grpcsvc.errnames import errno_name

from .uapi import MigState


class VfioError(OSError):
    """An ioctl/read/write failure: `errno` is what the kernel returns (positive).

    `last_state` is set by vfio_mig_step_loop (driver.vfio.migration) when a
    device-state change stops part way: the state the device was left in.
    `details`: what else a caller can read by machine (a firmware command's
    status and syndrome), by name.
    """

    last_state: MigState | None = None

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail or os.strerror(code))
        self.detail = detail

    @property
    def details(self) -> dict[str, str]:
        return {}

    @property
    def name(self) -> str:
        return errno_name(self.errno or 0)

    def __str__(self) -> str:
        return f"[{self.name}] {self.detail or os.strerror(self.errno or 0)}"

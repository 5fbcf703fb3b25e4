"""Errno names as the kernel spells them (grpcsvc/errnames.py): where the C
library has an alias, the kernel's name, as every C header and client in
another language knows it."""

from __future__ import annotations

import errno

import pytest

from driver.service.errnos import errno_name as driver_errno_name
from driver.vfio.errors import VfioError
from grpcsvc.errnames import errno_name
from vfioclient.client import VfioClientError


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (errno.EOPNOTSUPP, "EOPNOTSUPP"),  # not glibc's ENOTSUP
        (errno.EDEADLK, "EDEADLK"),  # not EDEADLOCK
        (errno.EAGAIN, "EAGAIN"),  # not EWOULDBLOCK
        (errno.EBADF, "EBADF"),
        (errno.ENOMSG, "ENOMSG"),
    ],
)
def test_the_kernels_name_everywhere_a_name_is_given(code: int, name: str) -> None:
    assert errno_name(code) == name
    assert driver_errno_name(code) == name  # ErrorInfo reasons, metrics, logs
    assert VfioError(code, "x").name == name  # the driver's errors
    assert VfioClientError(code, "x").name == name  # the client's


def test_every_other_number_keeps_its_one_name() -> None:
    aliased = {errno.EOPNOTSUPP, errno.EDEADLK, errno.EAGAIN}
    for code, name in errno.errorcode.items():
        if code not in aliased:
            assert errno_name(code) == name
    assert errno_name(4242) == "E4242"
    assert errno_name(4242, "INTERNAL_ERROR") == "INTERNAL_ERROR"

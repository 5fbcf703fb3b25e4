"""`vfio-driver serve --buffer-budget`, `--client-idle`,
`--switchover-priority` and, in embedded mode, `--memory-limit` reach the
objects they set; values out of bounds are usage errors (exit 2, naming the
range)."""

from __future__ import annotations

import argparse

import pytest

from driver.cli import _driver_server, _embedded_firmware, _parser, main
from driver.mlx5.cmd import DEFAULT_BUFFER_BUDGET
from driver.priority import DEFAULT_MAX_WAIT_S
from driver.service.process import CLIENT_IDLE
from fwemu.link.ifc import MiB


def _serve_args(*args: str) -> argparse.Namespace:
    return _parser().parse_args(["serve", "--vfs", "1", "--size", "64KiB", *args])


async def test_the_flags_reach_the_registry_the_servicer_and_the_firmware() -> None:
    args = _serve_args(
        "--buffer-budget", "64MiB", "--client-idle", "30", "--memory-limit", "32MiB",
        "--switchover-priority", "0",
    )  # fmt: skip
    fw = _embedded_firmware(args)
    try:
        server = _driver_server(args, [fw.link], fw, None)
        assert server.registry.budget.limit == 64 * MiB
        assert server.servicer.client_idle == 30.0
        assert server.registry.priority.max_wait == 0.0
        assert fw._fw.memory.limit == 32 * MiB
    finally:
        await fw.link.close()


async def test_without_the_flags_the_defaults_hold() -> None:
    args = _serve_args()
    fw = _embedded_firmware(args)
    try:
        server = _driver_server(args, [fw.link], fw, None)
        assert server.registry.budget.limit == DEFAULT_BUFFER_BUDGET == 1 << 30
        assert server.servicer.client_idle == CLIENT_IDLE
        assert server.registry.priority.max_wait == DEFAULT_MAX_WAIT_S == 0.5
    finally:
        await fw.link.close()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--buffer-budget", "0"], "'0' is out of range (1MiB to 1TiB)"),
        (["--buffer-budget", "2TiB"], "out of range (1MiB to 1TiB)"),
        (["--buffer-budget", "lots"], "is not a size"),
        (["--client-idle", "0"], "not a number of seconds above 0"),
        (["--client-idle", "-5"], "not a number of seconds above 0"),
        (["--client-idle", "nan"], "not a number of seconds above 0"),
        (["--client-idle", "1e9"], "at most 604800"),
        (["--switchover-priority", "-1"], "not a number of seconds from 0 to 10"),
        (["--switchover-priority", "nan"], "not a number of seconds from 0 to 10"),
        (["--switchover-priority", "inf"], "not a number of seconds from 0 to 10"),
        (["--switchover-priority", "11"], "not a number of seconds from 0 to 10"),
        (["--switchover-priority", "soon"], "not a number of seconds from 0 to 10"),
        (["--memory-limit", "0"], "the memory limit must be positive"),
        (["--memory-limit", "1EiB"], "'1EiB' is more than this machine's memory"),
        (["--memory-limit", "2KiB", "--vfs", "2"], "memory limit"),
        (["--firmware", "127.0.0.1:1", "--memory-limit", "1GiB"], "--memory-limit is for the"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], args: list[str], expect: str
) -> None:
    try:
        rc = main(["serve", "--listen", "127.0.0.1:0", "--size", "64KiB", *args])
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    assert rc == 2 and expect in err, err

"""`fwemu serve --mkeys-per-client`, `--client-idle` and `--max-remote-memory` reach the mkey memory
of the FirmwareServer (README, "Host memory"); values out of bounds are usage
errors (exit 2, naming the range), as are `--memory-limit`'s."""

from __future__ import annotations

import pytest

from fwemu.cli import _firmware_server, _parser, main
from fwemu.model import Firmware, VirtualClock
from fwemu.model.memory import machine_memory
from fwemu.service.memory import DEFAULT_IDLE_S, MAX_MKEYS_PER_CLIENT


async def test_the_flags_reach_the_mkey_memory() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    args = _parser().parse_args(["serve", "--mkeys-per-client", "16", "--client-idle", "2.5"])
    server = _firmware_server(args, fw, None)
    assert (server.memory.max_mkeys_per_client, server.memory.idle_s) == (16, 2.5)
    server = _firmware_server(_parser().parse_args(["serve"]), fw, None)
    assert (server.memory.max_mkeys_per_client, server.memory.idle_s) == (
        MAX_MKEYS_PER_CLIENT,
        DEFAULT_IDLE_S,
    )
    assert server.memory.max_remote_bytes == 8 << 30
    for given, held in (("0", 0), ("1TiB", 1 << 40), ("64MiB", 64 << 20)):
        args = _parser().parse_args(["serve", "--max-remote-memory", given])
        assert _firmware_server(args, fw, None).memory.max_remote_bytes == held


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--mkeys-per-client", "0"], "not a whole number from 1 to 1048576"),
        (["--mkeys-per-client", "-3"], "not a whole number from 1 to 1048576"),
        (["--mkeys-per-client", "2000000"], "not a whole number from 1 to 1048576"),
        (["--mkeys-per-client", "many"], "not a whole number"),
        (["--client-idle", "0"], "not a number of seconds above 0"),
        (["--client-idle", "inf"], "at most 604800"),
        (["--max-remote-memory", "1EiB"], "out of range (0 to 1TiB)"),
        (["--max-remote-memory", "-1"], "not a size"),
        (["--memory-limit", "1EiB"], "'1EiB' is more than this machine's memory"),
        (["--memory-limit", str(machine_memory() + 1)], "more than this machine's memory"),
        (["--memory-limit", "0"], "the memory limit must be positive"),
        (["--memory-limit", "lots"], "not a size"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], args: list[str], expect: str
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--listen", "127.0.0.1:0", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert expect in err, err

"""vfioctl's own options (--driver, --json, --timeout, --tls-*) work before or
after any command (issue 18): every command's parse is the same wherever they
stand, each command runs against the --driver given after it, and the demo
(which has its own parser) takes them before `demo` too."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.shards import pci_name
from tests.support.vfioctl_driver import Driver, run_vfioctl
from vfioclient.cli import build_parser, main
from vfioclient.cli.main import COMMANDS, NAMES

DEV, DEV2 = pci_name(1), pci_name(2)

# A command line of each command (scenario: of each action), without vfioctl's options.
COMMAND_LINES: list[list[str]] = [
    ["list"],
    ["show", DEV],
    ["set-state", DEV, "stop"],
    ["save", DEV, "f.img"],
    ["load", DEV, "f.img", "--run"],
    ["precopy-info", DEV, "--v2"],
    ["reset", DEV],
    ["migrate", DEV, DEV2, "--verify", "no"],
    ["events", "--device", DEV],
    ["audit", DEV],
    ["certs", "pki"],
    ["exam", "--scenario", "127.0.0.1:1"],
    ["scenario", "vfs"],
    ["scenario", "digest", "1", DEV2],
    ["scenario", "reconfigure", "1", "--object", "QP"],
    ["scenario", "configure", "1", "--dirty-rate", "1MiB"],
    ["scenario", "reset", "1"],
    ["scenario", "fault", "1", "fail"],
]

# vfioctl's options, each with a value to give.
OPTIONS: list[list[str]] = [
    ["--driver", "127.0.0.1:7"],
    ["--json"],
    ["--timeout", "2.5"],
    ["--tls-ca", "ca.pem"],
    ["--tls-cert", "c.pem"],
    ["--tls-key", "c.key"],
]


def test_the_command_lines_cover_every_command() -> None:
    assert {line[0] for line in COMMAND_LINES} == set(NAMES) - {"demo"} == {*COMMANDS, "scenario"}


def parsed(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@settings(max_examples=300, deadline=None)
@given(
    line=st.sampled_from(COMMAND_LINES),
    placed=st.lists(
        st.tuples(st.sampled_from(OPTIONS), st.sampled_from(["before", "after", "end"])),
        unique_by=lambda t: t[0][0],
    ),
)
def test_options_parse_alike_before_or_after_the_command(
    line: list[str], placed: list[tuple[list[str], str]]
) -> None:
    """Before the command, right after its word (scenario: after its action
    too), or at the end: the same namespace."""
    reference = parsed([*(w for option, _ in placed for w in option), *line])
    head = 2 if line[0] == "scenario" else 1
    before = [w for option, where in placed if where == "before" for w in option]
    after = [w for option, where in placed if where == "after" for w in option]
    end = [w for option, where in placed if where == "end" for w in option]
    argv = [*before, *line[:head], *after, *line[head:], *end]
    assert parsed(argv) == reference, argv


def test_an_option_after_the_command_wins_over_one_before(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parsed(["--driver", "a:1", "--timeout", "3", "list", "--driver", "b:2"])
    assert (args.driver, args.timeout) == ("b:2", 3.0)
    args = parsed(["scenario", "--json", "vfs", "--firmware", "f:1", "--timeout", "4"])
    assert (args.json, args.firmware, args.timeout) == (True, "f:1", 4.0)
    # A bad value after the command is the usual usage error.
    assert main(["list", "--timeout", "-1"]) == 2
    assert "not a positive number of seconds" in capsys.readouterr().err


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.grpc
def test_every_command_uses_the_driver_given_after_it(
    driver: Driver, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Each command runs against --driver and prints JSON for --json, both
    given after it (the default address, 127.0.0.1:50052, has no driver)."""
    img = str(tmp_path / "vf.img")
    t = driver.target
    lines = [
        ["list"],
        ["show", DEV],
        ["set-state", DEV2, "stop"],
        ["reset", DEV2],
        ["save", DEV, img],
        ["load", DEV2, img],
        ["reset", DEV2],
        ["precopy-info", DEV, "--iterations", "1", "--interval", "0.01"],
        ["audit"],
        ["migrate", DEV, DEV2],
        ["scenario", "vfs"],
        ["scenario", "digest", "1"],
    ]
    for line in lines:
        head = 2 if line[0] == "scenario" else 1
        for argv in (
            [*line, "--driver", t, "--json", "--timeout", "20"],
            [*line[:head], "--json", "--driver", t, *line[head:]],
        ):
            rc, out, err = run(capsys, argv)
            assert rc == 0, (argv, err)
            assert isinstance(json.loads(out), dict), argv
    rc, out, err = run(capsys, ["certs", str(tmp_path / "pki"), "--json"])  # connects to nothing
    assert rc == 0 and "ca" in json.loads(out), err


def test_tls_options_after_the_command_are_used(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(
        capsys, ["list", "--json", "--tls-ca", "/nonexistent/ca.pem", "--driver", "127.0.0.1:1"]
    )
    assert rc == 1 and "/nonexistent/ca.pem" in err
    assert json.loads(out)["error"]["name"] == "EINVAL"
    tls = ["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/c.key"]
    rc, _, err = run(capsys, ["scenario", "vfs", *tls, "--driver", "127.0.0.1:1"])
    assert rc == 1 and "/nonexistent/c.key" in err


DEMO = ["demo", "--size", "4MiB", "--dirty-rate", "1MiB"]


def test_the_demo_takes_json_before_demo(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, ["--json", *DEMO])
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["equal"] and doc["report"]["status"] == "completed"


@pytest.mark.grpc
def test_the_demo_takes_the_driver_before_demo(
    driver: Driver, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vfioctl --driver T demo` migrates between T's devices (not the
    embedded services'): T's firmware gives the digests the demo printed."""
    rc, out, err = run(capsys, ["--driver", driver.target, "--json", "demo"])
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["equal"] and (doc["source"], doc["destination"]) == (DEV, DEV2)
    assert driver.digests(1, 2) == [doc["source_digest"], doc["destination_digest"]]


def test_the_demo_takes_the_timeout_before_demo(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, ["--timeout", "60", "--json", *DEMO])
    assert rc == 0, err
    assert json.loads(out)["equal"]
    # Given before `demo`, it bounds the demo as the demo's own --timeout does.
    rc, _, err = run(capsys, ["--timeout", "0.001", *DEMO])
    assert rc != 0 and "timed out after 0.001 s" in err and "Traceback" not in err


def vfioctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return run_vfioctl(*argv, timeout=120)


@pytest.mark.grpc
def test_as_processes(driver: Driver) -> None:
    for argv in (
        ["list", "--driver", driver.target, "--json"],
        ["scenario", "vfs", "--json", "--firmware", driver.target],
        ["--driver", driver.target, "--json", "demo"],
        ["--json", *DEMO],
    ):
        p = vfioctl(*argv)
        assert p.returncode == 0, (argv, p.stderr)
        assert "Traceback" not in p.stderr
        assert isinstance(json.loads(p.stdout), dict), argv


def test_vfioctl_runs_on_asyncios_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not uvloop, unlike the services: uvloop 0.23 now and then never
    reports the exit of `exam --run`'s orchestrator (its Process.wait()
    hangs; 2 of 6 runs of tests/examples/test_node.py's exam did), and the
    CLI gains nothing measurable from it (the 64-process concurrency bench
    gave 2.85-3.46x either way)."""
    import asyncio
    import sys

    cli_main = sys.modules["vfioclient.cli.main"]  # (the package's `main` is the function)
    ran: list[type] = []

    async def record(args: argparse.Namespace, out: object) -> None:
        ran.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(cli_main, "_run", record)
    assert main(["list"]) == 0
    assert len(ran) == 1 and ran[0].__module__.startswith("asyncio"), ran

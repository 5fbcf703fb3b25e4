"""vfioctl imports what its command needs, and no more: 64 `vfioctl migrate`
started at once on 2 cores spend their start-up CPU beside the driver
(issue 16).  A command line imports its command's module alone; the whole
command list (--help, a usage error) imports them all and reads the same."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

import vfioclient
from vfioclient.cli import build_parser, main
from vfioclient.cli.main import COMMANDS, NAMES, _command_word

# Never needed to run a migration (nor to list devices).
HEAVY = (
    "cryptography",  # vfioctl certs
    "pydantic",  # grpcsvc.units.byte_size, on the first size parsed
    "vfioclient.exam",
    "vfioclient.cli.certs",
    "vfioclient.cli.demo",
    "vfioclient.cli.exam",
    # The services' own: a client needs none of them (grpcsvc.options has the
    # channel options both sides use).
    # (grpc itself imports the grpc_health and grpc_reflection packages.)
    "prometheus_client",
    "grpcsvc.server",
    "grpc_reflection.v1alpha",
    "grpc_health.v1",
)


def imported_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def loaded(modules: set[str], *names: str) -> list[str]:
    return [n for n in names if any(m == n or m.startswith(n + ".") for m in modules)]


def test_importing_vfioctl_loads_no_command_module() -> None:
    modules = imported_by("import vfioclient.cli")
    commands = {f"vfioclient.cli.{module}" for module, _ in COMMANDS.values()}
    assert loaded(modules, *HEAVY, *sorted(commands), "vfioclient.migration") == []


def test_a_migrate_command_line_loads_only_what_migrate_needs() -> None:
    modules = imported_by(
        "import contextlib, io\n"
        "from vfioclient.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--driver', '127.0.0.1:1', 'migrate', '--help']) == 0"
    )
    assert "vfioclient.cli.migrate" in modules
    assert loaded(modules, *HEAVY, "vfioclient.cli.devices", "vfioclient.cli.data") == []


def test_vfioclient_uapi_needs_no_grpc() -> None:
    """The package's names load on first use (PEP 562)."""
    modules = imported_by("import vfioclient.uapi")
    assert loaded(modules, "grpc", "google.protobuf", "vfioclient.client") == []


def test_every_name_of_vfioclient_resolves_to_its_module() -> None:
    for name in vfioclient.__all__:
        value = getattr(vfioclient, name)
        assert value is not None
    assert vfioclient.uapi.MigState is vfioclient.MigState
    assert vfioclient.VfioClient.__module__ == "vfioclient.client"
    assert set(vfioclient.__all__) <= set(dir(vfioclient))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = vfioclient.nope


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["list"], "list"),
        (["--driver", "h:1", "--json", "migrate", "a", "b", "--json"], "migrate"),
        (["--tls-ca=ca.pem", "scenario", "list-vfs"], "scenario"),
        (["--json", "demo", "--json"], "demo"),
        (["--timeout", "2.5", "precopy-info", "x"], "precopy-info"),
        # The whole parser reads these, and says what is wrong or prints the list:
        (["--help", "list"], None),
        (["--json", "-h"], None),
        (["lst"], None),
        (["--timeout", "soon", "list"], None),
        (["--driver"], None),
        (["--bogus", "list"], None),
        ([], None),
    ],
)
def test_the_command_word(argv: list[str], word: str | None) -> None:
    assert _command_word(argv) == word


@pytest.mark.parametrize("name", NAMES)
def test_one_commands_parser_reads_as_the_whole_one(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its --help, and its usage errors, are the whole parser's."""
    for argv in ([name, "--help"], [name, "--no-such-option"]):
        texts = []
        for parser in (build_parser(name), build_parser()):
            with pytest.raises(SystemExit):
                parser.parse_args(argv)
            texts.append(capsys.readouterr())
        assert texts[0] == texts[1], argv


def test_the_command_list_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["--help"]) == 0
    listed = out.getvalue()
    assert all(f"    {name} " in listed for name in NAMES)


def test_errors_still_map_to_errnos_with_lazy_imports() -> None:
    """Fresh processes: each client's error (the driver's, the Scenario
    service's) keeps its errno and hint; a usage error exits 2."""
    vfioctl = [sys.executable, "-m", "vfioclient.cli", "--timeout", "5", "--json"]
    for argv, name, hint in (
        (["--driver", "127.0.0.1:1", "list"], "ENOTCONN", "vfio-driver serve"),
        (["scenario", "--firmware", "127.0.0.1:1", "vfs"], "ECONNREFUSED", "fwemu serve"),
    ):
        r = subprocess.run([*vfioctl, *argv], capture_output=True, text=True)
        assert r.returncode == 1, r.stderr
        error = json.loads(r.stdout)["error"]
        assert error["name"] == name and hint in error["hint"]
    r = subprocess.run([*vfioctl, "lst"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'lst'" in r.stderr

"""vfioctl --help (issue 18): every option of every command has help text,
and shows its default where it has one that means something, once; no
"(default: None)"; descriptions keep their paragraphs."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vfioclient.cli import build_parser
from vfioclient.cli.args import HELP_FORMATTER, HelpFormatter
from vfioclient.cli.main import NAMES


def parsers(
    p: argparse.ArgumentParser, name: str = "vfioctl"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """`p` and every (sub)command's parser under it, with its command line."""
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                if word != "demo":  # its parser is the demo's own (vfioclient/cli/demo.py)
                    yield from parsers(sub, f"{name} {word}")


PARSERS = dict(parsers(build_parser()))


def test_every_command_and_scenario_action_is_walked() -> None:
    assert {n.split()[1] for n in PARSERS if " " in n} == set(NAMES) - {"demo"}
    assert "vfioctl scenario reconfigure" in PARSERS and len(PARSERS) > len(NAMES) + 5


def meaningful(default: object) -> bool:
    return default not in (None, False, argparse.SUPPRESS, [], ())


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_with_its_default_once(name: str) -> None:
    p = PARSERS[name]
    assert p.formatter_class is HELP_FORMATTER, name
    formatter = p._get_formatter()
    for action in p._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        what = f"{name} {'/'.join(action.option_strings) or action.metavar}"
        assert action.help and action.help.strip(), f"{what} has no help"
        text = formatter._expand_help(action)
        assert "(default: None)" not in text and "SUPPRESS" not in text, what
        defaults = len(re.findall(r"\bdefault\b", text, re.IGNORECASE))
        if meaningful(action.default) and (action.option_strings or action.nargs == "?"):
            assert defaults == 1, f"{what}: {text!r}"
        assert defaults <= 1, f"{what}: {text!r}"


def test_defaults_are_shown_as_written() -> None:
    formatter = PARSERS["vfioctl migrate"]._get_formatter()
    actions = {a.dest: a for a in PARSERS["vfioctl migrate"]._actions}
    assert formatter._expand_help(actions["data_path"]).endswith("(default: auto)")
    assert formatter._expand_help(actions["max_iterations"]).endswith("(default: 10000)")
    assert "(default 0.3 s)" in formatter._expand_help(actions["downtime_limit"])
    # A byte size in the unit one would write.
    p = argparse.ArgumentParser(formatter_class=HELP_FORMATTER)
    from grpcsvc.units import byte_size

    size = p.add_argument("--size", type=byte_size, default=64 << 20, help="VF state")
    assert p._get_formatter()._expand_help(size) == "VF state (default: 64MiB)"


def test_descriptions_keep_their_paragraphs() -> None:
    f = HelpFormatter("prog", width=40)
    text = "one " * 20 + "\n\nsecond paragraph\n\n    an example, as written\n    two"
    filled = f._fill_text(text, 40, "")
    paragraphs = filled.split("\n\n")
    assert len(paragraphs) == 3
    assert all(len(line) <= 40 for line in paragraphs[0].splitlines())
    assert paragraphs[2] == "    an example, as written\n    two"


def vfioctl_help(*argv: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "vfioclient.cli", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_help_as_a_process() -> None:
    text = vfioctl_help("migrate")
    flat = " ".join(text.split())
    assert "--data-path {auto,shm,grpc}" in text and "(default: auto)" in flat
    assert "--downtime-limit S the longest the devices may stay stopped" in flat
    assert "(default 0.3 s)" in flat and "(default: None)" not in text
    # vfioctl's own options, listed after the command's, with their defaults.
    assert "vfioctl options (before or after the command):" in text
    assert "--driver HOST:PORT the vfio-driver service (default 127.0.0.1:50052)" in flat
    assert (
        "--timeout SECONDS connect timeout and limit for the whole operation (default 30)" in flat
    )
    # The migrate description's two paragraphs stay two.
    assert "destination reset.\n\nAcross hosts" in text
    text = vfioctl_help("scenario", "fault")
    flat = " ".join(text.split())
    assert "--opcode OPCODE command (name or number) (default: SAVE_VHCA_STATE)" in flat
    assert "--count N commands to hit (default: 1)" in flat

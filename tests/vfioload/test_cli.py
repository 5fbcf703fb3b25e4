"""vfio-loadtest's own options: --mix parsed strictly, absurd values refused
with exit 2 and the reason, before Locust starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vfioload.mix import CLASS_NAMES, parse_mix

LOADTEST = [sys.executable, "-m", "vfioload.cli"]


def test_a_mix_names_classes_and_weights() -> None:
    assert parse_mix("reinit-loop:4, faults") == {"reinit-loop": 4, "faults": 1}
    assert list(parse_mix(",".join(CLASS_NAMES))) == list(CLASS_NAMES)


@pytest.mark.parametrize(
    ("mix", "why"),
    [
        ("", "no user class"),
        ("reinit", "no user class 'reinit'"),
        ("faults:1,faults:2", "faults given twice"),
        ("faults:0", "not between 1 and 1000"),
        ("faults:1e9", "is not a whole number"),
        ("faults:-3", "not between 1 and 1000"),
        ("faults:10000", "not between 1 and 1000"),
    ],
)
def test_a_bad_mix_is_refused_with_its_reason(mix: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_mix(mix)


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--mix", "nope"], "no user class 'nope'"),
        (["--vf-size", "0"], "--vf-size"),
        (["--vf-size", "1TiB"], "--vf-size"),
        (["--reconfig-bytes", "1"], "--reconfig-bytes"),
    ],
)
def test_absurd_options_exit_2_before_locust_starts(argv: list[str], why: str) -> None:
    r = subprocess.run([*LOADTEST, *argv, "--headless", "-t", "1s"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert why in r.stderr


def test_help_lists_our_options_and_points_to_locusts() -> None:
    r = subprocess.run([*LOADTEST, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for option in ("--driver", "--scenario", "--mix", "--vf-size", "--tls-ca", "--locust-help"):
        assert option in r.stdout


def test_a_shard_outside_the_pci_domains_is_refused() -> None:
    r = subprocess.run([*LOADTEST, "--shard", "65536"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 2 and "not a PCI domain" in r.stderr

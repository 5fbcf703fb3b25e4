"""grpcsvc.runner: the event loop a command runs on, and its exit status."""

from __future__ import annotations

import argparse
import asyncio

import pytest
import uvloop

from grpcsvc.runner import SIGINT_STATUS, add_loop_flag, run, run_main


class Refused(Exception):
    pass


class Unreachable(Exception):
    pass


ERRORS = {Refused: 2, (Unreachable, OSError): 1}


async def returns(value: int) -> int:
    return value


async def raises(error: BaseException) -> int:
    raise error


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_uses_the_loop_asked_for(loop: str) -> None:
    async def loop_class() -> type:
        return type(asyncio.get_running_loop())

    got = run(loop_class(), "uvloop" if loop == "uvloop" else "asyncio")
    assert (got is uvloop.Loop) == (loop == "uvloop")


def test_the_loop_flag_takes_the_loops_run_knows() -> None:
    p = argparse.ArgumentParser()
    add_loop_flag(p)
    assert p.parse_args([]).loop == "uvloop"
    assert p.parse_args(["--loop", "asyncio"]).loop == "asyncio"
    with pytest.raises(SystemExit):
        p.parse_args(["--loop", "trio"])


def test_run_main_returns_what_main_returns(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("prog", returns(3), ERRORS) == 3
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("error", "status"),
    [(Refused("bad scenario"), 2), (Unreachable("no firmware"), 1), (ConnectionError("gone"), 1)],
)
def test_a_known_error_is_one_line_and_its_status(
    error: Exception, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_main("prog", raises(error), ERRORS, "asyncio") == status
    assert capsys.readouterr().err == f"prog: error: {error}\n"


def test_kinds_are_tried_in_order() -> None:
    class Both(Refused, Unreachable):
        pass

    assert run_main("prog", raises(Both()), ERRORS) == 2
    assert run_main("prog", raises(Both()), dict(reversed(ERRORS.items()))) == 1


def test_ctrl_c_is_the_shells_sigint_status() -> None:
    assert run_main("prog", raises(KeyboardInterrupt()), ERRORS) == SIGINT_STATUS == 130


def test_any_other_error_propagates() -> None:
    with pytest.raises(ZeroDivisionError):
        run_main("prog", raises(ZeroDivisionError()), ERRORS)

"""exam: grade an orchestrator against the exam's traps (vfioclient/exam)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import shlex
import time

from grpcsvc.units import seconds_between

from ..client import VfioClient
from ..exam import TRAPS, Trap, Verdict, run_exam, summary
from ..scenario import ScenarioClient
from .command import Command
from .output import CliError, Out

MAX_TRAP_TIMEOUT = 86_400.0  # a day

STDERR_FD = 2
MARGIN_S = 1.0  # the verdicts are printed this long before --timeout ends the command


def _traps(names: list[str] | None) -> list[Trap]:
    unknown = [n for n in names or () if n not in TRAPS]
    if unknown:
        raise CliError(errno.EINVAL, f"no trap {unknown[0]!r}", "traps: " + ", ".join(TRAPS))
    return [TRAPS[n] for n in names] if names else list(TRAPS.values())


class _Launcher:
    """--run: start the orchestrator under test for each trap, and reap it."""

    def __init__(self, template: str | None, out: Out) -> None:
        self.template, self.out = template, out
        self.proc: asyncio.subprocess.Process | None = None

    async def ready(self, trap: Trap, source: str, destination: str) -> None:
        if self.out.json:
            self.out.note(f"{trap.name}: migrate {source} -> {destination}")
        self.out.line(f"{trap.name}: {trap.what}")
        self.out.line(f"  migrate {source} -> {destination} now")
        if self.template is not None:
            argv = [
                a.format(source=source, destination=destination, trap=trap.name)
                for a in shlex.split(self.template)
            ]
            # With --json stdout is the result document alone: its output goes to stderr.
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=STDERR_FD if self.out.json else None
            )

    async def reap(self, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _line(v: Verdict) -> str:
    mark = "PASS" if v.passed else "FAIL"
    extra = "" if v.fired else " (the trap did not fire)"
    return f"  {mark} {v.trap}: {v.outcome}{extra}\n" + "\n".join(f"    {r}" for r in v.reasons)


async def cmd_exam(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """grade an orchestrator against migration traps (REINIT, faults, caps)

    For each trap (all, or each --trap), one at a time: create a source and a
    destination VF through the Scenario service (--scenario: `fwemu serve`, or
    the driver's own with `vfio-driver serve --scenario-service`), arm the
    trap's preset (examples/exam/), print the PCI names of the devices to
    migrate, wait until the orchestrator under test (run elsewhere, or by
    --run) has opened and closed them again, then grade the run from the
    driver's audit findings, the devices' events and the firmware digests:
    pass or fail, and why. A trap whose moment never came runs again on a
    fresh pair (--attempts). --timeout bounds the whole exam; the verdicts are
    printed before it ends. Exit code 0 only if every trap passed. Needs a
    principal that sees every device's events (an admin over mTLS)."""
    deadline = time.monotonic() + args.timeout - MARGIN_S
    launcher = _Launcher(args.run, out)

    async def reap() -> None:
        await launcher.reap(max(0.1, min(5.0, deadline - time.monotonic())))

    def verdict(v: Verdict) -> None:
        out.line(_line(v))

    s = await ScenarioClient.connect(args.scenario, timeout=args.timeout, tls=args.tls)
    try:
        verdicts = await run_exam(
            c,
            s,
            _traps(args.trap),
            timeout=args.trap_timeout or args.timeout,
            deadline=deadline,
            attempts=args.attempts,
            on_ready=launcher.ready,
            after_run=reap,
            on_verdict=verdict,
        )
    finally:
        await s.aclose()
    doc = summary(verdicts)
    out.doc(doc)
    out.line(f"{doc['passed']}/{len(verdicts)} traps passed")
    if not doc["all_passed"]:
        # Exit code 1; the result is the one document on stdout, the error goes to stderr only.
        out.json = False
        raise CliError(errno.EPROTO, f"{doc['failed']} of {len(verdicts)} traps failed")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scenario",
        required=True,
        metavar="HOST:PORT",
        help="the Scenario service of --driver's firmware (fwemu serve, or the driver's own "
        "with --scenario-service)",
    )
    p.add_argument(
        "--trap",
        action="append",
        choices=list(TRAPS),
        metavar="NAME",
        help="a trap to run (repeatable; default all): " + ", ".join(TRAPS),
    )
    p.add_argument(
        "--trap-timeout",
        type=seconds_between(0.0, MAX_TRAP_TIMEOUT),
        metavar="SECONDS",
        help="how long to wait for the orchestrator on each trap (default: until --timeout; "
        "at most a day)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        choices=range(1, 11),
        default=3,
        metavar="N",
        help="runs of a trap whose moment never came, on fresh pairs (default 3)",
    )
    p.add_argument(
        "--run",
        metavar="CMD",
        help="start the orchestrator under test for each trap: CMD with {source}, "
        "{destination} and {trap} replaced (not through a shell)",
    )


EXAM = Command(cmd_exam, _arguments)

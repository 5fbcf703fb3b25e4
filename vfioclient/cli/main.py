"""The `vfioctl` command: drive a vfio-driver service from a shell.

Exit codes: 0 success, 1 the operation failed (the errno name and a hint are
printed), 2 usage errors.  `--json` prints one JSON document on stdout (on
failure: {"error": {"errno": ..., "name": ..., "message": ..., "hint": ...}}).

Each command group has its module, each command a Command (command.py) in
COMMANDS below; `scenario` adds its own subcommands, and `demo` has its own
parser (demo.py) and gets the rest of the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import sys
from collections.abc import Sequence

from ..client import VfioClient, VfioClientError
from ..scenario import ScenarioClientError
from . import data, demo, devices, events, migrate, precopy, scenario, state
from .args import seconds
from .command import Command
from .output import HINTS, PROG, CliError, Out, fail

DEFAULT_DRIVER = "127.0.0.1:50052"

# In the order of the command list (`demo` first, `scenario` last).
COMMANDS: dict[str, Command] = {
    "list": devices.LIST,
    "show": devices.SHOW,
    "set-state": state.SET_STATE,
    "save": data.SAVE,
    "load": data.LOAD,
    "precopy-info": precopy.PRECOPY_INFO,
    "reset": devices.RESET,
    "migrate": migrate.MIGRATE,
    "events": events.EVENTS,
    "audit": events.AUDIT,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Drive VFIO migration devices of a vfio-driver service "
        "(`vfio-driver serve`). Exit codes: 0 success, 1 the operation failed "
        "(errno name and hint printed), 2 usage errors.",
        epilog="examples: vfioctl list; vfioctl save 0000:81:00.1 vf1.img; "
        "vfioctl load 0000:81:00.2 vf1.img --run; vfioctl migrate 0000:81:00.1 0000:81:00.2",
    )
    p.add_argument(
        "--driver",
        default=DEFAULT_DRIVER,
        metavar="HOST:PORT",
        help=f"the vfio-driver service (default {DEFAULT_DRIVER})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="connect timeout and limit for the whole operation (default 30)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo.add_parser(sub)
    for name, command in COMMANDS.items():
        command.add_to(sub, name)
    scenario.add_parser(sub)
    return p


async def _run(args: argparse.Namespace, out: Out) -> None:
    if args.command == "scenario":
        await scenario.run_scenario(args, out)
        return
    c = await VfioClient.connect(args.driver, timeout=args.timeout)
    try:
        await COMMANDS[args.command].run(c, args, out)
    finally:
        await c.aclose()


def _hint(code: int, args: argparse.Namespace) -> str | None:
    if code in (errno.ECONNREFUSED, errno.ENOTCONN):
        if args.command == "scenario":
            where = args.firmware or args.driver
            return f"is `fwemu serve` or `vfio-driver serve --scenario-service` running at {where}?"
        return f"is vfio-driver serve running at {args.driver}?"
    return HINTS.get(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return demo.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help: 0, usage errors: 2
        return e.code if isinstance(e.code, int) else 2
    out = Out(args.json)

    async def bounded() -> None:
        if args.command == "events":  # live until interrupted: only connecting is timed
            await _run(args, out)
        else:
            await asyncio.wait_for(_run(args, out), args.timeout)

    try:
        asyncio.run(bounded())
    except (VfioClientError, ScenarioClientError) as e:
        code = e.errno or errno.EIO
        return fail(out, code, e.strerror or str(e), _hint(code, args))
    except CliError as e:
        return fail(out, e.errno, str(e), e.hint or _hint(e.errno, args))
    except TimeoutError:
        return fail(
            out, errno.ETIMEDOUT, f"timed out after {args.timeout:g} s", HINTS[errno.ETIMEDOUT]
        )
    except BrokenPipeError:  # `vfioctl ... | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the FILE of save/load
        code = e.errno or errno.EIO
        return fail(out, code, f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), None)
    except KeyboardInterrupt:
        return 0 if args.command == "events" else 130
    return 0

"""The `vfioctl` command: drive a vfio-driver service from a shell.

Exit codes: 0 success, 1 the operation failed (the errno name and a hint are
printed), 2 usage errors.  `--json` prints one JSON document on stdout (on
failure: {"error": {"errno": ..., "name": ..., "message": ..., "hint": ...}}).

Each command group has its module, each command a Command (command.py) in
COMMANDS below; `scenario` adds its own subcommands, and `demo` has its own
parser (demo.py) and gets the rest of the command line.

--tls-ca/--tls-cert/--tls-key (else VFIO_TLS_CA/CERT/KEY) apply to every
connection a command makes: the driver(s), and the firmware Scenario services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import sys
from collections.abc import Sequence

from grpcsvc.tls import TlsError, add_client_args, client_tls_from_args

from ..client import VfioClient, VfioClientError
from ..scenario import ScenarioClientError
from . import certs, data, demo, devices, events, exam, migrate, precopy, scenario, state
from .args import seconds
from .command import Command, LocalCommand
from .output import HINTS, PROG, CliError, Out, fail

DEFAULT_DRIVER = "127.0.0.1:50052"

# In the order of the command list (`demo` first, `scenario` last).
COMMANDS: dict[str, Command | LocalCommand] = {
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
    "certs": certs.CERTS,
    "exam": exam.EXAM,
}
TLS_HINT = (
    "the TLS handshake failed: check --tls-ca (the CA of the service's certificate), and "
    "--tls-cert/--tls-key (a service with --tls-client-ca requires a client certificate)"
)


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
    add_client_args(p)
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
    command = COMMANDS[args.command]
    if isinstance(command, LocalCommand):
        await command.run(args, out)
        return
    c = await VfioClient.connect(args.driver, timeout=args.timeout, tls=args.tls)
    try:
        await command.run(c, args, out)
    finally:
        await c.aclose()


def _hint(code: int, args: argparse.Namespace, message: str = "") -> str | None:
    if code in (errno.ECONNREFUSED, errno.ENOTCONN) and _tls_failure(message):
        return TLS_HINT
    if code in (errno.ECONNREFUSED, errno.ENOTCONN):
        if args.command == "scenario":
            where = args.firmware or args.driver
            hint = f"is `fwemu serve` or `vfio-driver serve --scenario-service` running at {where}?"
        else:
            hint = f"is vfio-driver serve running at {args.driver}?"
        if args.tls is None or args.tls.cert is None:  # a closed socket is all a refusal says
            hint += " Over TLS it needs --tls-ca, and with --tls-client-ca --tls-cert/--tls-key."
        return hint
    return HINTS.get(code)


def _tls_argv(args: argparse.Namespace) -> list[str]:
    """The --tls-* options given, as a command line."""
    return [
        f"--tls-{what}={value}"
        for what in ("ca", "cert", "key")
        if (value := getattr(args, f"tls_{what}")) is not None
    ]


def _tls_failure(message: str) -> bool:
    text = message.lower()
    return any(w in text for w in ("ssl", "handshake", "certificate", "tls"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return demo.main(argv[1:])
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command != "demo" and rest:
            parser.parse_args(argv)  # the usual error for what is left over
    except SystemExit as e:  # --help: 0, usage errors: 2
        return e.code if isinstance(e.code, int) else 2
    if args.command == "demo":  # `vfioctl --tls-... demo ...`: its own flags come later, and win
        return demo.main([*_tls_argv(args), *(["--json"] if args.json else []), *rest])
    out = Out(args.json)
    try:
        # Every connection the command makes uses it (args.tls; None: plaintext).
        args.tls = client_tls_from_args(args)
    except TlsError as e:
        return fail(out, errno.EINVAL, str(e), "give --tls-cert and --tls-key together")

    async def bounded() -> None:
        if args.command == "events":  # live until interrupted: only connecting is timed
            await _run(args, out)
        else:
            await asyncio.wait_for(_run(args, out), args.timeout)

    try:
        asyncio.run(bounded())
    except (VfioClientError, ScenarioClientError) as e:
        code = e.errno or errno.EIO
        message = e.strerror or str(e)
        return fail(out, code, message, _hint(code, args, message))
    except TlsError as e:  # a TLS file that cannot be read
        return fail(out, errno.EINVAL, str(e), "see --tls-ca/--tls-cert/--tls-key")
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

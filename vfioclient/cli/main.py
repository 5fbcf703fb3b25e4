"""The `vfioctl` command: drive a vfio-driver service from a shell.

Exit codes: 0 success, 1 the operation failed (the errno name and a hint are
printed), 2 usage errors.  `--json` prints one JSON document on stdout (on
failure: {"error": {"errno": ..., "name": ..., "message": ..., "hint": ...}}).

Each command group has its module, each command a Command (command.py) in
COMMANDS below; `scenario` adds its own subcommands, and `demo` has its own
parser (demo.py) and gets the rest of the command line, after vfioctl's
options given before `demo`.

vfioctl's options (--driver, --json, --timeout, --tls-*) go before or after
the command (command.add_options).  --tls-ca/--tls-cert/--tls-key (else
VFIO_TLS_CA/CERT/KEY) apply to every connection a command makes: the
driver(s), and the firmware Scenario services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from grpcsvc.heap import freeze_startup_heap
from grpcsvc.tls import TlsError, client_tls_from_args

from .args import HELP_FORMATTER
from .command import (
    DEFAULT_DRIVER,
    DEFAULT_TIMEOUT,
    FLAGS,
    Command,
    LocalCommand,
    add_options,
)
from .output import HINTS, PROG, CliError, Out, fail

# Each command's module and object, in the order of the command list (`demo`
# first, `scenario` last: their modules add their own parsers).  A command
# line imports only its command's module; the whole list (--help, a usage
# error before the command) imports them all.  64 `vfioctl migrate` at once
# on 2 cores: what each process does not import is CPU the driver gets.
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("devices", "LIST"),
    "show": ("devices", "SHOW"),
    "set-state": ("state", "SET_STATE"),
    "save": ("data", "SAVE"),
    "load": ("data", "LOAD"),
    "precopy-info": ("precopy", "PRECOPY_INFO"),
    "reset": ("devices", "RESET"),
    "migrate": ("migrate", "MIGRATE"),
    "events": ("events", "EVENTS"),
    "audit": ("events", "AUDIT"),
    "certs": ("certs", "CERTS"),
    "exam": ("exam", "EXAM"),
}
NAMES = ("demo", *COMMANDS, "scenario")


def _module(name: str) -> ModuleType:
    return importlib.import_module(f".{name}", __package__)


def command(name: str) -> Command | LocalCommand:
    """The Command of COMMANDS[name] (importing its module)."""
    module, attr = COMMANDS[name]
    found: Command | LocalCommand = getattr(_module(module), attr)
    return found


TLS_HINT = (
    "the TLS handshake failed: check --tls-ca (the CA of the service's certificate), and "
    "--tls-cert/--tls-key (a service with --tls-client-ca requires a client certificate)"
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """vfioctl's parser: every command, or `only` that one (one of NAMES),
    which imports that command's module alone and parses its command lines
    as the whole parser does."""
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=HELP_FORMATTER,
        description="Drive VFIO migration devices of a vfio-driver service "
        "(`vfio-driver serve`). Exit codes: 0 success, 1 the operation failed "
        "(errno name and hint printed), 2 usage errors. vfioctl's options "
        "(--driver, --json, --timeout, --tls-*) go before or after the command.",
        epilog="examples: vfioctl list; vfioctl save 0000:81:00.1 vf1.img; "
        "vfioctl load 0000:81:00.2 vf1.img --run; vfioctl migrate 0000:81:00.1 0000:81:00.2",
    )
    add_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in NAMES if only is None else (only,):
        if name in COMMANDS:
            command(name).add_to(sub, name)
        else:  # demo, scenario
            _module(name).add_parser(sub)
    return p


class _PeekError(Exception):
    pass


class _Peek(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _PeekError(message)


def _command_word(argv: Sequence[str]) -> str | None:
    """The command `argv` names after vfioctl's own options, if that is all
    it is (else None: the whole parser reads it, and says what is wrong)."""
    peek = _Peek(prog=PROG, add_help=False)
    add_options(peek)
    peek.add_argument("words", nargs=argparse.REMAINDER)
    try:
        args, unknown = peek.parse_known_args(argv)
    except _PeekError:
        return None
    words: list[str] = args.words
    if unknown or not words or words[0] not in NAMES:
        return None
    return words[0]


def _given_argv(args: argparse.Namespace) -> list[str]:
    """vfioctl's own options that a command line gave (before the command),
    as a command line: for the demo, which parses its own."""
    given = []
    for flag in FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is True:
            given.append(flag)
        elif value not in (None, False):
            given.append(f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}")
    return given


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    """`vfioctl [OPTIONS] demo [DEMO OPTIONS]`: the demo's own parser reads
    vfioctl's options given before `demo` first, its own after (which win)."""
    return int(_module("demo").main([*_given_argv(args), *rest]))


async def _run(args: argparse.Namespace, out: Out) -> None:
    if args.command == "scenario":
        await _module("scenario").run_scenario(args, out)
        return
    cmd = command(args.command)
    if getattr(args, "own_process", False):
        # Its imports done: out of the full collections' way (a migration
        # agent's stalls, as a service's: grpcsvc.heap).
        freeze_startup_heap(collect=False)
    if isinstance(cmd, LocalCommand):
        await cmd.run(args, out)
        return
    from ..client import VfioClient

    c = await VfioClient.connect(args.driver, timeout=args.timeout, tls=args.tls)
    try:
        await cmd.run(c, args, out)
    finally:
        await c.aclose()


def _client_errors() -> tuple[type[OSError], ...]:
    """The errors of the service clients (VfioClientError, ScenarioClientError)
    this run imported: a client that was never imported raised nothing."""
    found = []
    for module, name in (
        ("vfioclient.calls", "VfioClientError"),
        ("vfioclient.scenario", "ScenarioClientError"),
    ):
        if (m := sys.modules.get(module)) is not None:
            found.append(getattr(m, name))
    return tuple(found)


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
    if code == errno.EOPNOTSUPP and args.command == "scenario":
        return (
            "give --firmware HOST:PORT, the address of `fwemu serve` (the firmware behind a "
            "`vfio-driver serve --firmware`), or start the driver with --scenario-service"
        )
    return HINTS.get(code)


def _tls_failure(message: str) -> bool:
    text = message.lower()
    return any(w in text for w in ("ssl", "handshake", "certificate", "tls"))


def main(argv: Sequence[str] | None = None) -> int:
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return int(_module("demo").main(argv[1:]))
    parser = build_parser(_command_word(argv))
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command != "demo" and rest:
            parser.parse_args(argv)  # the usual error for what is left over
    except SystemExit as e:  # --help: 0, usage errors: 2
        return e.code if isinstance(e.code, int) else 2
    if args.command == "demo":
        return _demo(args, rest)
    # The program itself (its command line), not a caller in its own process
    # (a test): only then is the process's heap ours to freeze.
    args.own_process = argv_given is None
    args.driver = args.driver or DEFAULT_DRIVER
    args.timeout = args.timeout or DEFAULT_TIMEOUT
    out = Out(args.json)
    try:
        # Every connection the command makes uses it (args.tls; None: plaintext).
        args.tls = client_tls_from_args(args)
    except TlsError as e:
        return fail(out, errno.EINVAL, str(e), "give --tls-cert and --tls-key together")

    async def bounded() -> None:
        # Live until interrupted (events, an incoming migration agent): only
        # connecting is timed.
        if args.command == "events" or getattr(args, "incoming", None) is not None:
            await _run(args, out)
        else:
            await asyncio.wait_for(_run(args, out), args.timeout)

    try:
        asyncio.run(bounded())
    except _client_errors() as e:
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

"""The driver's events, live, and the audit's findings."""

from __future__ import annotations

import argparse
import json
import time

from driver.api.events import (
    Dropped,
    ErrorAnswered,
    Event,
    Finding,
    PrecopyAnswered,
    SaveCompleted,
    SaveFailed,
    StateChanged,
)

from ..client import VfioClient
from .command import Command
from .output import Out


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _what(ev: Event) -> str:
    p = ev.payload
    if isinstance(p, StateChanged):
        return f"{p.from_state} -> {p.to_state}" + (" (VFIO_DEVICE_RESET)" if p.reset else "")
    if isinstance(p, PrecopyAnswered):
        reinit = " REINIT" if p.reinit else ""
        return (
            f"v{p.version} initial_bytes={p.initial_bytes} dirty_bytes={p.dirty_bytes} "
            f"flags={p.flags:#x}{reinit}"
        )
    if isinstance(p, SaveCompleted):
        return f"image_bytes={p.image_bytes}"
    if isinstance(p, SaveFailed):
        return f"status={p.status:#x}" if p.status >= 0 else f"status={p.status}"
    if isinstance(p, ErrorAnswered):
        return f"{p.operation}: {p.errno_name} ({p.errno}) {p.message}"
    if isinstance(p, Finding):
        return f"{p.rule}: {p.message} [{p.reference}]"
    if isinstance(p, Dropped):
        return f"{p.count} events dropped (this subscriber fell behind)"
    return ""


def _who(client: str, data_fd: int, stream: int) -> str:
    who = [f"client={client}"] if client else []
    if data_fd >= 0:
        who.append(f"fd={data_fd}")
    if stream:
        who.append(f"stream={stream}")
    return " ".join(who)


def event_line(ev: Event) -> str:
    """One line: time, device, kind, what happened, who."""
    who = _who(ev.client, ev.data_fd, ev.stream)
    tail = f"  ({who})" if who else ""
    return f"{_clock(ev.time)} {ev.device or '-':<14} {ev.kind:<14} {_what(ev)}{tail}"


async def cmd_events(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """print the driver's events live

    Follow state changes, precopy info answers, SAVE completions and failures,
    errno answers and audit findings as they happen, one line each (JSON lines
    with --json), until Ctrl-C or the service stops (exit 0 either way)."""
    async with c.events(args.device) as events:
        await events.ready()
        out.note(f"following {args.device or 'every device'} (Ctrl-C to stop)")
        async for ev in events:
            if out.json:
                print(json.dumps(ev.to_dict()), flush=True)
            else:
                print(event_line(ev), flush=True)


async def cmd_audit(c: VfioClient, args: argparse.Namespace, out: Out) -> None:
    """what clients did that would go wrong, or slow, on a real device

    The orchestrator audit's findings (rule id, client, what happened and what
    to do instead, and the kernel or QEMU source the rule comes from). Exit 0
    with or without findings."""
    report = await c.audit(args.device)
    out.doc(
        {
            "device": args.device,
            "findings": [f.to_dict() for f in report.findings],
            "counts": report.counts,
        }
    )
    if not report.findings:
        out.line(f"{args.device or 'all devices'}: no findings")
        return
    for f in report.findings:
        who = _who(f.client, f.data_fd, f.stream)
        out.line(f"{_clock(f.time)} {f.device} {f.rule}  {who}".rstrip())
        out.line(f"  {f.message}")
        out.line(f"  reference: {f.reference}")
    counts = ", ".join(f"{rule}={n}" for rule, n in sorted(report.counts.items()))
    out.line(f"counts: {counts}")


def _events_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", metavar="DEVICE", help="only this device (default: all)")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON lines")


def _audit_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("device", metavar="DEVICE", nargs="?", help="one device (default: all)")
    s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one document")


EVENTS = Command(cmd_events, _events_arguments)
AUDIT = Command(cmd_audit, _audit_arguments)

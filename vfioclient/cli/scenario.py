"""scenario: the firmware's Scenario service (VFs, digests, reconfigurations, faults)."""

from __future__ import annotations

import argparse
import errno
from dataclasses import asdict

from fwemu.link.ifc import VfConfig
from grpcsvc.units import byte_size

from ..scenario import FAULT_KINDS, ScenarioClient
from .args import object_spec, positive
from .command import Subparsers
from .output import CliError, Out


def _pci_function(name: str) -> int | None:
    """0000:81:dd.f -> function id (dd << 3 | f)."""
    try:
        _, _, devfn = name.rpartition(":")
        dev, _, fn = devfn.partition(".")
        return (int(dev, 16) << 3) | int(fn)
    except ValueError:
        return None


async def _vhca(s: ScenarioClient, vf: str) -> int:
    """A VF named by vhca id (a number) or by its PCI device name."""
    if vf.isdigit():
        return int(vf)
    fn = _pci_function(vf)
    if fn is not None:
        for v in await s.list_vfs():
            if v.function_id == fn:
                return v.vhca_id
    raise CliError(errno.ENOENT, f"no VF {vf!r}", "name a VF by vhca id or PCI name (scenario vfs)")


async def run_scenario(args: argparse.Namespace, out: Out) -> None:
    target = args.firmware or args.driver
    s = await ScenarioClient.connect(target, timeout=args.timeout, tls=args.tls)
    try:
        if args.scenario_command == "vfs":
            if args.create:
                cfg = VfConfig(size=args.size) if args.size else None
                await s.create_vfs(args.create, cfg)
            vfs = await s.list_vfs()
            out.doc({"vfs": [asdict(v) for v in vfs]})
            out.line(f"{'VHCA':>5} {'FN':>4} {'SIZE':>10} {'SAVED':>10} {'LOADED':>10} RECONF")
            for v in vfs:
                out.line(
                    f"{v.vhca_id:>5} {v.function_id:>4} {v.config.size:>10} {v.saved_bytes:>10} "
                    f"{v.loaded_bytes:>10} {v.reconfigurations}"
                )
        elif args.scenario_command == "digest":
            digests = {vf: await s.digest(await _vhca(s, vf)) for vf in args.vf}
            out.doc({"digests": digests})
            for vf, d in digests.items():
                out.line(f"{vf} {d}")
        elif args.scenario_command == "reconfigure":
            vhca = await _vhca(s, args.vf)
            tid = await s.reconfigure(
                vhca,
                args.object or None,
                at_time=args.at_time,
                after_saved_bytes=args.after_saved_bytes,
            )
            out.doc({"vhca_id": vhca, "trigger_id": tid})
            out.line(f"vhca {vhca}: reconfiguration armed (trigger {tid})")
        elif args.scenario_command == "fault":
            vhca = await _vhca(s, args.vf)
            try:
                fid = await s.inject_fault(
                    vhca,
                    args.kind,
                    opcode=args.opcode,
                    status=args.status,
                    syndrome=args.syndrome,
                    delay_s=args.delay,
                    count=args.count,
                    in_completion=args.in_completion,
                )
            except ValueError as e:
                raise CliError(
                    errno.EINVAL, str(e), "see `vfioctl scenario fault --help`"
                ) from None
            out.doc({"vhca_id": vhca, "fault_id": fid, "kind": args.kind})
            out.line(f"vhca {vhca}: {args.kind} fault armed (fault {fid})")
    finally:
        await s.aclose()


def _add_vf_action(
    ssub: Subparsers, name: str, *, help: str, description: str, nargs: str | None = None
) -> argparse.ArgumentParser:
    """An action on a VF (VF: a vhca id or a PCI device name), or on several (nargs)."""
    s = ssub.add_parser(name, help=help, description=description)
    s.add_argument("vf", metavar="VF", nargs=nargs)
    return s


def add_parser(sub: Subparsers) -> None:
    sc = sub.add_parser(
        "scenario",
        help="the firmware's Scenario service (digests, VFs, reconfigurations, faults)",
        description="Talk to a firmware's Scenario service: `fwemu serve`, or "
        "`vfio-driver serve --scenario-service` (the default: the --driver address). "
        "A VF is named by vhca id or by PCI device name.",
    )
    sc.add_argument(
        "--firmware", metavar="HOST:PORT", help="the Scenario service (default: --driver)"
    )
    ssub = sc.add_subparsers(dest="scenario_command", required=True, metavar="ACTION")
    s = ssub.add_parser("vfs", help="list VFs (or create some)", description="List the VFs.")
    s.add_argument("--create", type=positive, metavar="N", help="create N VFs first")
    s.add_argument("--size", type=byte_size, metavar="BYTES", help="state size of created VFs")
    _add_vf_action(
        ssub,
        "digest",
        help="VF state digests",
        description="Digest of each VF's state (stable while the VF is suspended).",
        nargs="+",
    )
    s = _add_vf_action(
        ssub,
        "reconfigure",
        help="reconfigure a VF (now, at a time, or after N saved bytes)",
        description="Add objects to a VF: during PRE_COPY this makes the driver REINIT.",
    )
    s.add_argument(
        "--object",
        type=object_spec,
        action="append",
        metavar="TYPE[:SIZE]",
        help="an object to add (QP, CQ, MKEY, EQ, SRQ, RQ, SQ, TIR, TIS); repeatable",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--at-time", type=float, metavar="T", help="at firmware time T")
    g.add_argument("--after-saved-bytes", type=byte_size, metavar="N", help="after N saved bytes")
    s = _add_vf_action(
        ssub,
        "fault",
        help="inject a firmware fault",
        description="Arm a fault on a VF's next matching command(s).",
    )
    s.add_argument("kind", metavar="KIND", choices=FAULT_KINDS, help=", ".join(FAULT_KINDS))
    s.add_argument("--opcode", default="SAVE_VHCA_STATE", help="command (name or number)")
    s.add_argument("--status", default="INT_ERR", help="firmware status (name or number)")
    s.add_argument("--syndrome", default="INJECTED", help="syndrome (name or number)")
    s.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="delay faults")
    s.add_argument("--count", type=positive, default=1, metavar="N", help="commands to hit")
    s.add_argument(
        "--in-completion", action="store_true", help="SAVE FAIL reported in the completion"
    )

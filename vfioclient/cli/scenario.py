"""scenario: the firmware's Scenario service (VFs, digests, reconfigurations, faults)."""

from __future__ import annotations

import argparse
import errno
import math
from dataclasses import asdict

from fwemu.link.ifc import ReconfigMode, VfConfig, VfInfo
from fwemu.link.scenario_requests import reconfig_mode
from grpcsvc.units import byte_size

from ..scenario import FAULT_KINDS, RECONFIG_MODES, ScenarioClient
from .args import object_spec, positive
from .command import Subparsers, add_command_parser, add_options
from .output import CliError, Out, table


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
            rows = [
                (v.vhca_id, v.function_id, v.config.size, v.saved_bytes, v.loaded_bytes,
                 v.reconfigurations)
                for v in vfs
            ]  # fmt: skip
            header = ("VHCA", "FN", "SIZE", "SAVED", "LOADED", "RECONF")
            for line in table(header, rows, right=" ".join(header)):
                out.line(line)
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
                mode=args.mode,
            )
            out.doc({"vhca_id": vhca, "trigger_id": tid, "mode": args.mode})
            out.line(f"vhca {vhca}: {args.mode} reconfiguration armed (trigger {tid})")
        elif args.scenario_command == "configure":
            vhca = await _vhca(s, args.vf)
            changes = _config_changes(args)
            if not changes:
                raise CliError(
                    errno.EINVAL, "nothing to change", "see `vfioctl scenario configure --help`"
                )
            _show_vf(out, await s.configure_vf(vhca, **changes))
        elif args.scenario_command == "reset":
            _show_vf(out, await s.reset_vf(await _vhca(s, args.vf)), "reset to its seed")
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


def _config_changes(args: argparse.Namespace) -> dict[str, object]:
    """The VfConfig fields `configure` sets (the options given)."""
    changes: dict[str, object] = {}
    if args.dirty_rate is not None:
        changes["dirty_bytes_per_s"] = args.dirty_rate
    if args.reconfig_rate is not None:
        changes["reconfig_rate_per_s"] = args.reconfig_rate
    if args.reconfig_mode is not None:
        changes["reconfig_mode"] = reconfig_mode(args.reconfig_mode)
    if args.reconfig_bytes is not None:
        changes["reconfig_bytes"] = args.reconfig_bytes
    return changes


def _show_vf(out: Out, v: VfInfo, what: str = "configured") -> None:
    cfg = v.config
    out.doc({"vf": asdict(v)})
    out.line(
        f"vhca {v.vhca_id}: {what}: size {v.state_size}, {v.num_objects} objects, "
        f"reconfigurations {cfg.reconfig_rate_per_s:g}/s of {cfg.reconfig_bytes} bytes "
        f"({ReconfigMode(cfg.reconfig_mode).name.lower()})"
    )


def _rate(text: str) -> float:
    """Automatic reconfigurations per second: 0 to VfConfig.MAX_RECONFIG_RATE."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= VfConfig.MAX_RECONFIG_RATE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate from 0 to {VfConfig.MAX_RECONFIG_RATE:g} per second"
        )
    return value


def _add_vf_action(
    ssub: Subparsers, name: str, *, help: str, description: str, nargs: str | None = None
) -> argparse.ArgumentParser:
    """An action on a VF (VF: a vhca id or a PCI device name), or on several (nargs)."""
    s = add_command_parser(ssub, name, help=help, description=description)
    vfs = "VFs" if nargs else "VF"
    s.add_argument("vf", metavar="VF", nargs=nargs, help=f"the {vfs}: vhca id or PCI device name")
    return s


def add_parser(sub: Subparsers) -> None:
    sc = add_command_parser(
        sub,
        "scenario",
        help="the firmware's Scenario service (digests, VFs, reconfigurations, faults)",
        description="Talk to a firmware's Scenario service: `fwemu serve`, or "
        "`vfio-driver serve --scenario-service` (the default: the --driver address). "
        "A VF is named by vhca id or by PCI device name.",
    )
    firmware_help = "the Scenario service (default: the --driver address)"
    sc.add_argument("--firmware", metavar="HOST:PORT", help=firmware_help)
    ssub = sc.add_subparsers(dest="scenario_command", required=True, metavar="ACTION")
    s = add_command_parser(
        ssub, "vfs", help="list VFs (or create some)", description="List the VFs."
    )
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
    s.add_argument(
        "--mode",
        choices=RECONFIG_MODES,
        default="add",
        help="add the objects (default), replace the oldest objects by them (the state "
        "does not grow), or remove the oldest objects (at least the objects' size)",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument("--at-time", type=float, metavar="T", help="at firmware time T")
    g.add_argument("--after-saved-bytes", type=byte_size, metavar="N", help="after N saved bytes")
    s = _add_vf_action(
        ssub,
        "configure",
        help="change a VF's workload and automatic reconfigurations",
        description="Change settings of a live VF (those given).",
    )
    s.add_argument("--dirty-rate", type=byte_size, metavar="BYTES_PER_S", help="workload")
    s.add_argument(
        "--reconfig-rate",
        type=_rate,
        metavar="PER_S",
        help="automatic reconfigurations per second of running time (a Poisson process "
        "seeded from the VF's seed; 0: none)",
    )
    s.add_argument(
        "--reconfig-mode", choices=RECONFIG_MODES, help="what automatic reconfigurations do"
    )
    s.add_argument(
        "--reconfig-bytes", type=byte_size, metavar="BYTES", help="size of each reconfiguration"
    )
    _add_vf_action(
        ssub,
        "reset",
        help="put a VF back to the state it was created in",
        description="Reset a VF to its seeded state (as created with its config and seed): "
        "reconfigurations, scheduled reconfigurations and faults are dropped; a migration "
        "of it ends as by an FLR (a SAVE in flight completes ABORTED).",
    )
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
    s.add_argument(
        "--delay", type=float, default=0.0, metavar="SECONDS", help="how long a delay fault waits"
    )
    s.add_argument("--count", type=positive, default=1, metavar="N", help="commands to hit")
    s.add_argument(
        "--in-completion", action="store_true", help="SAVE FAIL reported in the completion"
    )
    # --firmware and vfioctl's options before or after the action, too.
    for action in ssub.choices.values():
        action.add_argument(
            "--firmware", metavar="HOST:PORT", default=argparse.SUPPRESS, help=firmware_help
        )
        add_options(action, after_command=True)
    add_options(sc, after_command=True)

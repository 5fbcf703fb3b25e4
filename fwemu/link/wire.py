"""The fwemu wire format: interface values (fwemu.link.ifc) <-> protobuf
messages, for GrpcLink and for the servicers (fwemu.service).

Conversion goes by field name: a dataclass field travels in the message field
of the same name.  The rules where the two differ:

* a dataclass-valued field the message lacks is spread into the message
  (VfInfo.config: the VfInfo message carries the configuration's fields);
* `_GROUPS`: message fields that group the value's own fields, as the PRM lays
  out capabilities (QueryHcaCapResponse.cmd_hca_cap, .cmd_hca_cap_2);
* `_RENAMED`: fields whose names differ;
* what is said explicitly below (page track ranges, fault kinds, the
  capability type of a QUERY_HCA_CAP answer, a VF's configuration changes,
  a reconfiguration's objects and time).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from operator import attrgetter
from typing import Any, TypeVar, cast, get_type_hints

from google.protobuf.message import Message

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import scenario_pb2 as spb
from .ifc import (
    Command,
    CreatePageTrackIn,
    DestroyPageTrackIn,
    Fault,
    FaultKind,
    FunctionLevelResetIn,
    LoadVhcaStateIn,
    ModifyPageTrackIn,
    PageTrackResult,
    QueryHcaCapIn,
    QueryVhcaMigrationStateIn,
    R,
    ResumeVhcaIn,
    SaveVhcaStateIn,
    SuspendVhcaIn,
    VfInfo,
)
from .scenario_requests import (
    AdvanceClockIn,
    ApplyScenarioIn,
    ClearFaultsIn,
    ConfigureVfIn,
    CreateVfsIn,
    GetClockIn,
    GetDigestIn,
    GetVfIn,
    InjectFaultIn,
    ListVfsIn,
    ReconfigureIn,
    RemoveVfIn,
    ResetVfIn,
    ScenarioRequest,
    SetVfHoldersIn,
)

# The metadata key naming a firmware client (GrpcLink sends it; a client's mkeys
# live as long as its completion stream).
CLIENT_KEY = "x-fwemu-client"

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_GROUPS = frozenset({"cmd_hca_cap", "cmd_hca_cap_2"})
_RENAMED: dict[type, dict[str, str]] = {PageTrackResult: {"dirty": "dirty_addresses"}}


@dataclass(frozen=True, slots=True)
class Rpc:
    """A command's Firmware RPC: its method name and messages, and the field
    naming it in a CommandQueue command and answer (the name in snake case)."""

    name: str
    request: type[Message]
    response: type[Message]
    queued: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "queued", re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower())


RPCS: dict[type[Command[Any]], Rpc] = {
    QueryHcaCapIn: Rpc("QueryHcaCap", fpb.QueryHcaCapRequest, fpb.QueryHcaCapResponse),
    QueryVhcaMigrationStateIn: Rpc(
        "QueryVhcaMigrationState",
        fpb.QueryVhcaMigrationStateRequest,
        fpb.QueryVhcaMigrationStateResponse,
    ),
    SaveVhcaStateIn: Rpc("SaveVhcaState", fpb.SaveVhcaStateRequest, fpb.SaveVhcaStateResponse),
    LoadVhcaStateIn: Rpc("LoadVhcaState", fpb.LoadVhcaStateRequest, fpb.CommandResponse),
    SuspendVhcaIn: Rpc("SuspendVhca", fpb.SuspendVhcaRequest, fpb.CommandResponse),
    ResumeVhcaIn: Rpc("ResumeVhca", fpb.ResumeVhcaRequest, fpb.CommandResponse),
    FunctionLevelResetIn: Rpc(
        "FunctionLevelReset", fpb.FunctionLevelResetRequest, fpb.CommandResponse
    ),
    CreatePageTrackIn: Rpc(
        "CreatePageTracker", fpb.CreatePageTrackerRequest, fpb.PageTrackerResponse
    ),
    ModifyPageTrackIn: Rpc(
        "ReportPageTracker", fpb.ReportPageTrackerRequest, fpb.PageTrackerResponse
    ),
    DestroyPageTrackIn: Rpc(
        "DestroyPageTracker", fpb.DestroyPageTrackerRequest, fpb.CommandResponse
    ),
}

# A CommandQueue command's field (QueuedCommand.command) -> its in-struct.
QUEUED: dict[str, type[Command[Any]]] = {rpc.queued: cls for cls, rpc in RPCS.items()}
# The most commands a CommandQueue stream holds in flight (mlx5's command queue has 32 slots).
QUEUE_SLOTS = 32


@dataclass(frozen=True, slots=True)
class ScenarioRpc:
    """A scenario request's RPC: its method name, its request message, how to
    read the answer from the response, and its service (Firmware for what
    only drivers say)."""

    name: str
    request: type[Message]
    answer: Callable[[Any], Any]
    service: str = "Scenario"


def _vf(m: Any) -> VfInfo:
    return from_pb(VfInfo, m)


def _vfs(m: Any) -> list[VfInfo]:
    return [from_pb(VfInfo, v) for v in m.vfs]


SCENARIO_RPCS: dict[type[ScenarioRequest[Any]], ScenarioRpc] = {
    CreateVfsIn: ScenarioRpc("CreateVfs", spb.CreateVfsRequest, _vfs),
    RemoveVfIn: ScenarioRpc("RemoveVf", spb.RemoveVfRequest, lambda m: None),
    ConfigureVfIn: ScenarioRpc("ConfigureVf", spb.ConfigureVfRequest, _vf),
    GetVfIn: ScenarioRpc("GetVf", spb.GetVfRequest, _vf),
    ListVfsIn: ScenarioRpc("ListVfs", spb.ListVfsRequest, _vfs),
    ReconfigureIn: ScenarioRpc("Reconfigure", spb.ReconfigureRequest, attrgetter("trigger_id")),
    ResetVfIn: ScenarioRpc("ResetVf", spb.ResetVfRequest, _vf),
    InjectFaultIn: ScenarioRpc("InjectFault", spb.InjectFaultRequest, attrgetter("fault_id")),
    ClearFaultsIn: ScenarioRpc("ClearFaults", spb.ClearFaultsRequest, attrgetter("cleared")),
    GetDigestIn: ScenarioRpc("GetDigest", spb.GetDigestRequest, attrgetter("digest")),
    ApplyScenarioIn: ScenarioRpc("ApplyScenario", spb.ApplyScenarioRequest, _vfs),
    GetClockIn: ScenarioRpc("GetClock", spb.ClockRequest, attrgetter("now")),
    AdvanceClockIn: ScenarioRpc("AdvanceClock", spb.AdvanceClockRequest, attrgetter("now")),
    SetVfHoldersIn: ScenarioRpc(
        "SetVfHolders", fpb.SetVfHoldersRequest, lambda m: None, service="Firmware"
    ),
}


# --- generic conversion ----------------------------------------------------------


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_message(fd: Any) -> bool:
    return fd.message_type is not None


def _repeated(fd: Any) -> bool:
    return bool(fd.is_repeated)


def to_pb(value: Any, msg_cls: type[M]) -> M:
    """The message of `msg_cls` carrying `value`'s fields."""
    msg = msg_cls()
    _fill(msg, value)
    return msg


# How a field travels, decided once per (dataclass, message) pair: the command
# path converts on every firmware call, so the plan is not rebuilt per call.
_SCALAR, _REPEATED, _MESSAGE = range(3)


@dataclass(frozen=True, slots=True)
class _FillPlan:
    groups: tuple[str, ...]  # message fields grouping the value's own fields
    spreads: tuple[str, ...]  # value fields the message lacks: spread if dataclass-valued
    own: tuple[tuple[str, str, int], ...]  # (attribute, message field, how)


_FILL_PLANS: dict[tuple[type, type], _FillPlan] = {}


def _fill_plan(value_cls: type, msg_cls: type[Message]) -> _FillPlan:
    plan = _FILL_PLANS.get((value_cls, msg_cls))
    if plan is None:
        plan = _FILL_PLANS[value_cls, msg_cls] = _make_fill_plan(value_cls, msg_cls)
    return plan


def _make_fill_plan(value_cls: type, msg_cls: type[Message]) -> _FillPlan:
    by_name = msg_cls.DESCRIPTOR.fields_by_name
    names = [f.name for f in fields(cast(Any, value_cls))]
    renamed = _RENAMED.get(value_cls, {})
    own: list[tuple[str, str, int]] = []
    for name in names:
        fd = by_name.get(renamed.get(name, name))
        if fd is None:
            continue
        if _is_message(fd):
            if not _repeated(fd):  # repeated messages: said explicitly
                own.append((name, fd.name, _MESSAGE))
        else:
            own.append((name, fd.name, _REPEATED if _repeated(fd) else _SCALAR))
    return _FillPlan(
        groups=tuple(g for g in sorted(_GROUPS) if g in by_name),
        spreads=tuple(n for n in names if n not in by_name),
        own=tuple(own),
    )


def _fill(msg: Message, value: Any) -> None:
    plan = _fill_plan(type(value), type(msg))
    for group in plan.groups:
        sub = getattr(msg, group)
        sub.SetInParent()
        _fill(sub, value)
    for name in plan.spreads:  # spread first: the value's own fields win
        v = getattr(value, name)
        if is_dataclass(v):
            _fill(msg, v)
    for name, wire, how in plan.own:
        v = getattr(value, name)
        if v is None:
            continue
        if how == _SCALAR:
            setattr(msg, wire, v)
        elif how == _REPEATED:
            getattr(msg, wire).extend(v)
        else:
            sub = getattr(msg, wire)
            sub.CopyFrom(to_pb(v, type(sub)))


def _scalar_paths(msg_cls: type[Message]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Each scalar field's path from the message (through groups) and whether
    it is repeated; a grouped field of the same name as an earlier one wins."""
    out: dict[str, tuple[tuple[str, ...], bool]] = {}
    for fd in msg_cls.DESCRIPTOR.fields:
        if fd.name in _GROUPS:
            sub_cls = type(getattr(msg_cls(), fd.name))
            for name, (path, rep) in _scalar_paths(sub_cls).items():
                out[name] = ((fd.name, *path), rep)
        elif not _is_message(fd):
            out[fd.name] = ((fd.name,), _repeated(fd))
    return out


@dataclass(frozen=True, slots=True)
class _ReadPlan:
    nested: tuple[tuple[str, str | None, type], ...]  # (field, message field or None, class)
    scalars: tuple[tuple[str, tuple[str, ...], bool], ...]  # (field, path, repeated)


_READ_PLANS: dict[tuple[type, type], _ReadPlan] = {}


def _read_plan(cls: type, msg_cls: type[Message]) -> _ReadPlan:
    plan = _READ_PLANS.get((cls, msg_cls))
    if plan is None:
        plan = _READ_PLANS[cls, msg_cls] = _make_read_plan(cls, msg_cls)
    return plan


def _make_read_plan(cls: type, msg_cls: type[Message]) -> _ReadPlan:
    paths = _scalar_paths(msg_cls)
    by_name = msg_cls.DESCRIPTOR.fields_by_name
    renamed = _RENAMED.get(cls, {})
    hints = _hints(cls)
    nested: list[tuple[str, str | None, type]] = []
    scalars: list[tuple[str, tuple[str, ...], bool]] = []
    for f in fields(cast(Any, cls)):
        wire = renamed.get(f.name, f.name)
        t = hints[f.name]
        if is_dataclass(t):
            nested.append((f.name, wire if wire in by_name else None, cast(type, t)))
        elif wire in paths:
            path, rep = paths[wire]
            scalars.append((f.name, path, rep))
    return _ReadPlan(tuple(nested), tuple(scalars))


def from_pb(cls: type[T], msg: Message, **given: Any) -> T:
    """A `cls` from the message's fields; `given` fields are not on the wire."""
    plan = _read_plan(cls, type(msg))
    values: dict[str, Any] = {}
    for name, wire, sub_cls in plan.nested:
        if name not in given:
            values[name] = from_pb(sub_cls, getattr(msg, wire) if wire is not None else msg)
    for name, path, rep in plan.scalars:
        if name in given:
            continue
        v: Any = msg
        for step in path:
            v = getattr(v, step)
        values[name] = list(v) if rep else v
    return cls(**values, **given)


def changes(base: Any, msg: Message) -> dict[str, Any]:
    """The fields a message of optional fields sets, nested values overlaid on `base`'s."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        if _is_message(fd):
            out[fd.name] = overlay(getattr(base, fd.name), getattr(msg, fd.name))
        elif msg.HasField(fd.name):
            out[fd.name] = getattr(msg, fd.name)
    return out


def overlay(base: T, msg: Message) -> T:
    """`base` with the fields the message sets."""
    return replace(base, **changes(base, msg))  # type: ignore[type-var]


# --- what differs --------------------------------------------------------------------


def command_to_pb(cmd: Command[Any]) -> Message:
    msg = RPCS[type(cmd)].request()
    _fill_command(msg, cmd)
    return msg


def queued_to_pb(token: int, cmd: Command[Any]) -> fpb.QueuedCommand:
    """A CommandQueue command: `cmd`'s request in its field, with `token`."""
    msg = fpb.QueuedCommand(token=token)
    request = getattr(msg, RPCS[type(cmd)].queued)
    request.SetInParent()
    _fill_command(request, cmd)
    return msg


def _fill_command(msg: Message, cmd: Command[Any]) -> None:
    _fill(msg, cmd)
    if isinstance(cmd, CreatePageTrackIn):
        assert isinstance(msg, fpb.CreatePageTrackerRequest)
        msg.ranges.extend(fpb.PageTrackRange(start_address=a, length=n) for a, n in cmd.ranges)


def command_from_pb(
    cls: type[Command[Any]], msg: Any, *, principal: str | None = None
) -> Command[Any]:
    """The in-struct of a request; `principal`, the caller the service
    authenticated, goes into the commands that name an mkey (never from the wire)."""
    given: dict[str, Any] = {"principal": principal} if _names_an_mkey(cls) else {}
    if cls is CreatePageTrackIn:
        given["ranges"] = tuple((r.start_address, r.length) for r in msg.ranges)
    return from_pb(cls, msg, **given)


def _names_an_mkey(cls: type) -> bool:
    return "principal" in getattr(cls, "__dataclass_fields__", ())


def answer_to_pb(token: int, cls: type[Command[Any]], result: Any) -> fpb.CommandAnswer:
    """A CommandQueue answer: the outbox of a `cls` command in its field, with `token`."""
    msg = fpb.CommandAnswer(token=token)
    response = getattr(msg, RPCS[cls].queued)
    response.SetInParent()
    _fill(response, result)
    return msg


def result_from_pb(cmd: Command[R], msg: Message) -> R:
    """The outbox a command's response carries."""
    # Not on the wire: the capability type is what QUERY_HCA_CAP asked for.
    given = {"cap_type": cmd.op_mod >> 1} if isinstance(cmd, QueryHcaCapIn) else {}
    return cast(R, from_pb(cmd.out, msg, **given))


def request_to_pb(req: ScenarioRequest[Any]) -> Message:
    if isinstance(req, SetVfHoldersIn):
        return fpb.SetVfHoldersRequest(vhca_id=req.vhca_id, principals=sorted(req.principals))
    if isinstance(req, ConfigureVfIn):
        cfg = spb.VfConfig(**{k: v for k, v in req.changes.items() if k != "caps"})
        if req.changes.get("caps") is not None:
            cfg.caps.CopyFrom(to_pb(req.changes["caps"], spb.Caps))
        return spb.ConfigureVfRequest(vhca_id=req.vhca_id, config=cfg)
    msg = to_pb(req, SCENARIO_RPCS[type(req)].request)
    if isinstance(req, ReconfigureIn):
        assert isinstance(msg, spb.ReconfigureRequest)
        msg.objects.extend(spb.ObjectSpec(type=t, size=s) for t, s in req.objects)
        if req.at_time is None and req.after_saved_bytes is None:
            msg.now = True
    return msg


def fault_from_pb(m: spb.Fault) -> Fault:
    try:
        kind = FaultKind(m.kind)
    except ValueError:
        raise ValueError(f"unknown fault kind {m.kind}") from None
    return from_pb(Fault, m, kind=kind, count=m.count or 1)

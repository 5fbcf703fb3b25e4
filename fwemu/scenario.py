"""Scenario files (YAML or JSON): VFs to create, reconfigurations to schedule and
faults to arm.  The same things the Scenario gRPC service does, written down so
that the same seed and scenario give the same run.  `EXAMPLE` shows one (the
tests run it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from .link.ifc import (
    MAX_U16,
    CmdStatus,
    Fault,
    FaultKind,
    FirmwareError,
    Opcode,
    ReconfigMode,
    VfCaps,
    VfConfig,
    obj_type_index,
)
from .link.scenario_requests import (
    MAX_AFTER_SAVED_BYTES,
    MAX_AT_TIME,
    MAX_RECONFIG_OBJECTS,
    MAX_SCENARIO_TEXT,
    reconfig_mode,
)
from .model.clock import Clock
from .model.firmware import Firmware
from .model.limits import MAX_ARMED_FAULTS, MAX_PENDING_TRIGGERS, LimitReached
from .model.memory import OutOfMemory
from .model.vf import Vf

EXAMPLE = """\
seed: 42
defaults: {size: 256KiB, dirty_bytes_per_s: 64KiB, reconfig_bytes: 16KiB}
vfs:
  - count: 2
  - count: 1
    size: 128KiB
    caps: {migration_state: false}      # older firmware: never reports INIT
events:
  - vf: 1
    at: 0.5                             # seconds after the scenario starts
    reconfigure: {objects: [{type: CQ, size: 8KiB}]}
  - vf: all
    after_saved_bytes: 1KiB
    reconfigure: {}
  - vf: 3
    fault: {kind: fail, opcode: QUERY_VHCA_MIGRATION_STATE, status: BAD_SYS_STATE_ERR,
            syndrome: 0x1234}
"""


# Bounds of a scenario document (README, "Scenario files"): its YAML is checked
# event by event before anything is built, so an alias bomb ("billion laughs")
# or a deep nesting is refused after reading at most MAX_YAML_NODES nodes.
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000
MAX_EVENTS = 4096
# Events times the VFs they name ("vf: all"): what one scenario may arm or schedule.
MAX_ACTIONS = 1 << 16


class ScenarioError(ValueError):
    """A scenario that cannot be read or applied; the message says where and why."""


def _enum_value(enum_cls: Any) -> Any:
    def parse(v: Any) -> Any:
        if isinstance(v, str):
            name = v.strip().upper()
            if name in enum_cls.__members__:
                return int(enum_cls[name])
            try:
                return int(name, 0)
            except ValueError:
                names = ", ".join(enum_cls.__members__)
                raise ValueError(f"{v!r} is not a number nor one of {names}") from None
        return v

    return BeforeValidator(parse)


OpcodeField = Annotated[int, _enum_value(Opcode), Field(ge=0, le=0xFFFF)]
StatusField = Annotated[int, _enum_value(CmdStatus), Field(ge=1, le=0xFF)]
# add, replace, remove (any case; or their numbers)
_MODE_NAMES = [m.name.lower() for m in ReconfigMode] + [m.name for m in ReconfigMode]
ModeField = Annotated[
    int,
    BeforeValidator(lambda v: int(reconfig_mode(v))),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": _MODE_NAMES},
                {"type": "integer", "minimum": min(ReconfigMode), "maximum": max(ReconfigMode)},
            ]
        }
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CapsSpec(_Strict):
    migration: bool | None = None
    adv_virtualization: bool | None = None
    migratable: bool | None = None
    migration_multi_load: bool | None = None
    migration_tracking_state: bool | None = None
    migration_in_chunks: bool | None = None
    migration_state: bool | None = None

    def overlay(self, base: VfCaps) -> VfCaps:
        return replace(base, **{k: v for k, v in self.model_dump().items() if v is not None})


class VfSpec(_Strict):
    size: ByteSize | None = None
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    dirty_bytes_per_s: ByteSize | None = None
    save_bandwidth: ByteSize | None = None
    save_latency_s: float | None = Field(
        default=None, ge=0, le=VfConfig.MAX_LATENCY_S, allow_inf_nan=False
    )
    chunk_size: ByteSize | None = None
    reconfig_bytes: ByteSize | None = None
    reconfig_rate_per_s: float | None = Field(
        default=None, ge=0, le=VfConfig.MAX_RECONFIG_RATE, allow_inf_nan=False
    )
    reconfig_mode: ModeField | None = None
    caps: CapsSpec = Field(default_factory=CapsSpec)

    def overlay(self, base: VfConfig) -> VfConfig:
        values = self.model_dump(exclude={"caps", "count"}, exclude_none=True)
        cfg = replace(base, **values, caps=self.caps.overlay(base.caps))
        cfg.validate()
        return cfg


class VfGroup(VfSpec):
    count: int = Field(default=1, ge=1, le=Firmware.MAX_VFS)


class ObjectSpecModel(_Strict):
    type: str = "QP"
    size: ByteSize

    @model_validator(mode="after")
    def _check(self) -> ObjectSpecModel:
        obj_type_index(self.type)
        if not 1 <= self.size <= VfConfig.MAX_SIZE:
            raise ValueError(f"object size must be between 1 and {VfConfig.MAX_SIZE}")
        return self


class ReconfigureSpec(_Strict):
    objects: list[ObjectSpecModel] = Field(default_factory=list, max_length=MAX_RECONFIG_OBJECTS)
    mode: ModeField = int(ReconfigMode.ADD)


class FaultSpec(_Strict):
    kind: Literal["fail", "delay", "drop_completion", "delay_completion", "tracking_lost"]
    opcode: OpcodeField = int(Opcode.SAVE_VHCA_STATE)
    status: StatusField = int(CmdStatus.INT_ERR)
    syndrome: int = Field(default=0x465700FF, ge=0, le=0xFFFFFFFF)
    delay_s: float = Field(default=0.0, ge=0, le=Fault.MAX_DELAY_S, allow_inf_nan=False)
    count: int = Field(default=1, ge=1, le=Fault.MAX_COUNT)
    in_completion: bool = False

    def to_fault(self) -> Fault:
        # The other fields are the Fault's, by name.
        fault = Fault(FaultKind[self.kind.upper()], **self.model_dump(exclude={"kind"}))
        fault.validate()
        return fault


class EventSpec(_Strict):
    vf: int | Literal["all"]
    at: float | None = Field(default=None, ge=0, le=MAX_AT_TIME, allow_inf_nan=False)
    after_saved_bytes: ByteSize | None = Field(default=None, ge=0, le=MAX_AFTER_SAVED_BYTES)
    reconfigure: ReconfigureSpec | None = None
    fault: FaultSpec | None = None

    @model_validator(mode="after")
    def _one_action(self) -> EventSpec:
        if (self.reconfigure is None) == (self.fault is None):
            raise ValueError("an event has exactly one of 'reconfigure' or 'fault'")
        if self.at is not None and self.after_saved_bytes is not None:
            raise ValueError("give 'at' or 'after_saved_bytes', not both")
        if self.fault is not None and (self.at is not None or self.after_saved_bytes is not None):
            raise ValueError("faults are armed when the scenario is applied; drop 'at'")
        if self.fault is not None:
            self.fault.to_fault()
        return self


class ScenarioFile(_Strict):
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    defaults: VfSpec = Field(default_factory=VfSpec)
    vfs: list[VfGroup] = Field(default_factory=list, max_length=MAX_U16)
    events: list[EventSpec] = Field(default_factory=list, max_length=MAX_EVENTS)


def parse_scenario(text: str, source: str = "scenario") -> ScenarioFile:
    """Read a YAML or JSON scenario; errors name the file, the place and the rule."""
    if len(text) > MAX_SCENARIO_TEXT:
        raise ScenarioError(
            f"{source}: a scenario is at most {MAX_SCENARIO_TEXT} characters, got {len(text)}"
        )
    try:
        _check_yaml_shape(text, source)
        data = yaml.load(text, Loader=_LOADER) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ScenarioError(f"{source}: not valid YAML or JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a mapping, got {type(data).__name__}")
    try:
        return ScenarioFile.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top)"
            lines.append(f"  {where}: {err['msg']}")
        raise ScenarioError(f"{source}: invalid scenario:\n" + "\n".join(lines)) from None


# libyaml's loader when PyYAML has it (ten times faster); both are safe loaders.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_yaml_shape(text: str, source: str) -> None:
    """Refuse YAML nested deeper than MAX_YAML_DEPTH or of more than
    MAX_YAML_NODES nodes once its aliases are expanded (what validating it
    would walk), and recursive aliases; from the parser's events, in one pass,
    before any node is built."""
    nodes = 0
    # anchor -> (nodes, height) of the node it names, once that node is complete
    anchored: dict[str, tuple[int, int]] = {}
    # open collections: [anchor, nodes before it, its level, deepest level under it]
    stack: list[list[Any]] = []

    def add(count: int, level: int) -> None:
        nonlocal nodes
        nodes += count
        if nodes > MAX_YAML_NODES:
            raise ScenarioError(
                f"{source}: more than {MAX_YAML_NODES} YAML nodes (aliases expanded)"
            )
        if level > MAX_YAML_DEPTH:
            raise ScenarioError(f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        if stack:
            stack[-1][3] = max(stack[-1][3], level)

    for ev in yaml.parse(text, Loader=_LOADER):
        level = len(stack) + 1
        if isinstance(ev, yaml.AliasEvent):
            if ev.anchor not in anchored:
                raise ScenarioError(f"{source}: alias *{ev.anchor} is undefined or recursive")
            count, height = anchored[ev.anchor]
            add(count, level + height - 1)
        elif isinstance(ev, yaml.ScalarEvent):
            add(1, level)
            if ev.anchor is not None:
                anchored[ev.anchor] = (1, 1)
        elif isinstance(ev, yaml.CollectionStartEvent):
            add(1, level)
            stack.append([ev.anchor, nodes - 1, level, level])
        elif isinstance(ev, yaml.CollectionEndEvent):
            anchor, before, start, deepest = stack.pop()
            if stack:
                stack[-1][3] = max(stack[-1][3], deepest)
            if anchor is not None:
                anchored[anchor] = (nodes - before, deepest - start + 1)


def load_scenario_file(path: str) -> ScenarioFile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SCENARIO_TEXT + 1)
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read scenario: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: a scenario file is UTF-8 text") from None
    return parse_scenario(text, path)


def _vf_seed(scenario_seed: int, index: int) -> int:
    return (scenario_seed * 1_000_003 + index + 1) % (1 << 64)


def apply_scenario(fw: Firmware, doc: ScenarioFile) -> list[Vf]:
    """Create the scenario's VFs, schedule its reconfigurations, arm its faults.

    VF numbers in events are vhca_ids.  Times are seconds from now on the
    firmware clock.  All or nothing: everything that can be checked (VF
    settings, event targets, the per-VF caps on armed faults and pending
    reconfigurations, the memory of reconfigurations that run at once) is
    checked before the firmware changes, and a refusal met while applying
    takes back the VFs created, faults armed and reconfigurations scheduled.
    Reconfigurations that run at once go last, since they cannot be taken
    back (README, "Scenario files").
    """
    try:
        base = doc.defaults.overlay(fw.defaults)
        configs: list[VfConfig] = []
        for group in doc.vfs:
            cfg = group.overlay(base)
            configs.extend([cfg] * group.count)
    except ValueError as e:
        raise ScenarioError(f"invalid VF settings: {e}") from None
    vf_count = len(fw.vfs) + len(configs)
    actions = sum(vf_count if ev.vf == "all" else 1 for ev in doc.events)
    if actions > MAX_ACTIONS:
        raise ScenarioError(
            f"events: {actions} actions (events times the VFs they name), at most {MAX_ACTIONS}"
        )
    undo = _Undo(fw)
    ran = 0
    try:
        for i, cfg in enumerate(configs):
            if cfg.seed is None and doc.seed is not None:
                cfg = replace(cfg, seed=_vf_seed(doc.seed, i))
            undo.created.extend(fw.create_vfs(1, cfg))
        # Every event's VF must exist before any event acts: a reconfiguration
        # 'now' cannot be taken back.
        for n, ev in enumerate(doc.events):
            if ev.vf != "all" and ev.vf not in fw.vfs:
                raise ScenarioError(f"events.{n}: no VF with vhca_id {ev.vf}")
        now = fw.clock.now()
        plan = [
            _Action.of(fw, n, ev, v, now)
            for n, ev in enumerate(doc.events)
            for v in (sorted(fw.vfs) if ev.vf == "all" else [ev.vf])
        ]
        _check_caps(fw, plan)
        for act in plan:
            if act.fault is not None:
                undo.armed.append((act.vhca_id, fw.inject_fault(act.vhca_id, act.fault)))
            elif not act.runs_now:
                undo.scheduled.append((act.vhca_id, act.reconfigure(fw)))
        for act in plan:
            if act.runs_now:
                act.reconfigure(fw)
                ran += 1
    except (FirmwareError, ValueError) as e:
        undo.run()
        msg = str(e)
        if ran:
            msg += f" ({ran} reconfiguration(s) had already run at once and stay)"
        # A full cap or the memory limit keeps its own kind (RESOURCE_EXHAUSTED).
        kind = type(e) if isinstance(e, LimitReached | OutOfMemory) else ScenarioError
        raise kind(msg) from None
    return undo.created


@dataclass(slots=True)
class _Action:
    """One event on one VF, as planned before anything changes."""

    index: int
    vhca_id: int
    fault: Fault | None
    objects: list[tuple[int, int]]
    at_time: float | None
    after_saved_bytes: int | None
    runs_now: bool
    mode: int = ReconfigMode.ADD

    @classmethod
    def of(cls, fw: Firmware, index: int, ev: EventSpec, vhca_id: int, now: float) -> _Action:
        try:
            fault = None if ev.fault is None else ev.fault.to_fault()
        except ValueError as e:
            raise ScenarioError(f"events.{index}: {e}") from None
        objects = (
            []
            if ev.reconfigure is None
            else [(obj_type_index(o.type), int(o.size)) for o in ev.reconfigure.objects]
        )
        at_time = None if ev.at is None else now + ev.at
        after = None if ev.after_saved_bytes is None else int(ev.after_saved_bytes)
        runs_now = fault is None and fw.reconfig_runs_now(vhca_id, at_time, after)
        mode = ReconfigMode.ADD if ev.reconfigure is None else ev.reconfigure.mode
        return cls(index, vhca_id, fault, objects, at_time, after, runs_now, mode)

    def reconfigure(self, fw: Firmware) -> int:
        return fw.reconfigure(
            self.vhca_id,
            self.objects,
            at_time=self.at_time,
            after_saved_bytes=self.after_saved_bytes,
            mode=self.mode,
        )

    def growth(self, vf: Vf) -> int:
        """At most how much running now grows the VF's state (ADD appends,
        REPLACE grows only beyond the whole state, REMOVE never)."""
        size = sum(s for _, s in self.objects) or vf.config.reconfig_bytes
        if self.mode == ReconfigMode.ADD:
            return size
        if self.mode == ReconfigMode.REPLACE:
            return max(0, size - vf.state.size)
        return 0


def _check_caps(fw: Firmware, plan: list[_Action]) -> None:
    """The per-VF caps and the memory of reconfigurations that run at once,
    for the whole plan, before anything is applied."""
    faults: Counter[int] = Counter()
    waiting: Counter[int] = Counter()
    grows: Counter[int] = Counter()
    for act in plan:
        vf = fw.vf(act.vhca_id)
        if act.fault is not None:
            faults[act.vhca_id] += 1
        elif act.runs_now:
            grows[act.vhca_id] += act.growth(vf)
        else:
            waiting[act.vhca_id] += 1
    for vhca_id, n in faults.items():
        held = len(fw.vf(vhca_id).faults.faults)
        if held + n > MAX_ARMED_FAULTS:
            raise LimitReached(
                f"VF {vhca_id}: {n} faults to arm beside {held} armed, "
                f"at most {MAX_ARMED_FAULTS} per VF"
            )
    for vhca_id, n in waiting.items():
        held = len(fw.vf(vhca_id).triggers)
        if held + n > MAX_PENDING_TRIGGERS:
            raise LimitReached(
                f"VF {vhca_id}: {n} reconfigurations to schedule beside {held} pending, "
                f"at most {MAX_PENDING_TRIGGERS} per VF"
            )
    for vhca_id, n in grows.items():
        vf = fw.vf(vhca_id)
        if vf.state.size + n > vf.size_limit:
            raise OutOfMemory(
                f"VF {vhca_id}: reconfigurations now would grow its state to "
                f"{vf.state.size + n} bytes, beyond its size limit {vf.size_limit}"
            )
    total = sum(grows.values())
    if fw.memory.used + total > fw.memory.limit:
        raise OutOfMemory(
            f"reconfigurations now need {total} bytes; the firmware holds {fw.memory.used} "
            f"of its {fw.memory.limit}-byte memory limit"
        )


@dataclass(slots=True)
class _Undo:
    """What apply_scenario changed that can be taken back."""

    fw: Firmware
    created: list[Vf] = field(default_factory=list)
    armed: list[tuple[int, int]] = field(default_factory=list)
    scheduled: list[tuple[int, int]] = field(default_factory=list)

    def run(self) -> None:
        for vhca_id, fault_id in self.armed:
            self.fw.disarm_fault(vhca_id, fault_id)
        for vhca_id, trigger_id in self.scheduled:
            self.fw.cancel_reconfigure(vhca_id, trigger_id)
        for vf in self.created:
            if vf.vhca_id in self.fw.vfs:
                self.fw.remove_vf(vf.vhca_id)


def build_firmware(
    clock: Clock,
    defaults: VfConfig,
    *,
    seed: int,
    scenario: str | None,
    vfs: int | None,
    seed_offset: int = 0,
) -> Firmware:
    """The firmware a service starts with: defaults for its VFs, then the
    scenario file's VFs and events, then `vfs` more VFs (4 without a
    scenario).  Bad settings or scenario contents are ScenarioErrors.
    `seed_offset` is added to the seed in force (the scenario's, else `seed`):
    shards of one scenario hold different VFs."""
    try:
        defaults.validate()
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    doc = load_scenario_file(scenario) if scenario else None
    if doc is not None and doc.seed is not None:
        doc = doc.model_copy(update={"seed": (doc.seed + seed_offset) % (1 << 64)})
    else:
        seed += seed_offset
    fw = Firmware(clock, seed=doc.seed if doc and doc.seed is not None else seed, defaults=defaults)
    try:
        if doc is not None:
            apply_scenario(fw, doc)
        count = vfs if vfs is not None else (0 if doc else 4)
        if count:
            fw.create_vfs(count)
    except FirmwareError as e:
        raise ScenarioError(str(e)) from None
    return fw


def json_schema() -> str:
    """The scenario file's JSON schema (for editors and validators)."""
    return json.dumps(ScenarioFile.model_json_schema(), indent=2)

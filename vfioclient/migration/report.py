"""The migration report: what `migrate` returns (and a MigrationError
carries), as data (`to_dict`, `to_json`) and as text for a person
(`report_text`; `--json` prints all of it)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ReinitEvent:
    device: str
    at_s: float  # since the migration started
    iteration: int
    # "setup" (the first PRECOPY_INFO, right after PRE_COPY) | "precopy" |
    # "after-switchover-decision"
    phase: str
    initial_bytes: int
    precopy_bytes_before: int  # the device's precopy bytes read before the REINIT
    # "the first ack waits for them" (setup) | "ack re-armed" | "failed" |
    # "ack re-armed, back to precopy"
    handling: str


@dataclass
class DeviceReport:
    name: str
    migration_flags: int = 0
    pre_copy: bool = False
    p2p: bool = False
    precopy_info_v2: bool = False
    dma_logging: bool = False
    buffer_size: int = 0
    # "shm" (user memory on both sides), "shm (source), grpc (destination)",
    # or "grpc"
    data_path: str = ""
    precopy_bytes: int = 0
    stop_copy_bytes: int = 0
    reads: int = 0
    empty_reads: int = 0
    init_data_sent: int = 0  # INIT_DATA_SENT markers the source sent
    acks: int = 0  # approvals the destination gave
    # multifd (stop-copy): packets sent (the last one empty), packets that arrived
    # ahead of a lower index, the most packets held waiting for a missing one,
    # the most bytes queued (sent, not yet written).
    multifd_packets: int = 0
    multifd_out_of_order: int = 0
    multifd_max_reorder_depth: int = 0
    multifd_max_queued_bytes: int = 0
    # verification (MigrationOptions.digests): empty when not verified
    source_digest: str = ""
    destination_digest: str = ""


@dataclass
class MigrationReport:
    status: str = "setup"  # setup | precopy | switchover | completed | failed
    error: str | None = None
    iterations: int = 0
    converged: bool = False  # False: switched over at max_precopy_iterations
    exact_queries: int = 0
    precopy_bytes: int = 0
    stop_copy_bytes: int = 0
    reinits: list[ReinitEvent] = field(default_factory=list)
    downtime_s: float | None = None  # first source stop to the last destination RUNNING
    downtime_limit_s: float = 0.0  # MigrationOptions.downtime_limit_s
    # downtime_s > downtime_limit_s: the switchover took longer than the limit
    # the decision was made for (a slow stop-copy, a wrong bandwidth estimate).
    downtime_exceeded: bool = False
    # Time spent verifying (MigrationOptions.digests, on_destinations_loaded):
    # inside the stop, but not counted in downtime_s.
    hook_s: float = 0.0
    verified: bool = False  # every device's digests compared equal
    stop_copy_s: float = 0.0  # first STOP_COPY to the last byte written
    throughput_Bps: float = 0.0  # all bytes moved / total_s
    stop_copy_throughput_Bps: float = 0.0  # stop-copy bytes / stop_copy_s
    total_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    devices: list[DeviceReport] = field(default_factory=list)
    # How the stream travelled: "" in this process, else the destination
    # agent's address (tcp:HOST:PORT, unix:PATH).
    channel: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


class MigrationError(Exception):
    """The migration failed; `report` says how far it got (sources left
    RUNNING); `errno` the kernel errno behind it when there is one (a
    destination's failed LOAD, say)."""

    def __init__(
        self, message: str, report: MigrationReport | None = None, *, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.report = report
        self.errno = errno


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


REPORT_WIDTH = 80
_VALUE_AT = 13  # "  device     ": where a field's value starts


def _wrapped(line: str, width: int) -> list[str]:
    """A report line cut at spaces to `width` columns, continued under the
    field's value (under its text for the first line)."""
    if len(line) <= width:
        return [line]
    is_field = line.startswith("  ") and line[2:3] != " " and line[_VALUE_AT - 1] == " "
    indent = " " * (_VALUE_AT if is_field else 2)
    return textwrap.wrap(
        line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def report_text(r: dict[str, Any], width: int = REPORT_WIDTH) -> str:
    """The migration report for a person (--json prints all of it), its lines
    cut to `width` columns where they have spaces."""
    return "\n".join(w for line in _report_lines(r) for w in _wrapped(line, width))


def _report_lines(r: dict[str, Any]) -> list[str]:
    status = r["status"] + (f": {r['error']}" if r.get("error") else "")
    lines = [f"migration {status}"]
    moved = r.get("precopy_bytes", 0) + r.get("stop_copy_bytes", 0)
    lines.append(
        f"  moved      {format_bytes(moved)}: precopy {format_bytes(r.get('precopy_bytes', 0))} in "
        f"{r.get('iterations', 0)} iterations"
        + ("" if r.get("converged") else " (not converged)")
        + f", stop-copy {format_bytes(r.get('stop_copy_bytes', 0))}"
    )
    downtime = r.get("downtime_s")
    total = f"total {r.get('total_s', 0.0):.3f} s"
    lines.append(
        f"  time       downtime {downtime * 1000:.1f} ms, {total}"
        if downtime is not None
        else f"  time       {total}"
    )
    if r.get("downtime_exceeded") and downtime is not None:
        lines.append(
            f"  WARNING    downtime {downtime * 1000:.1f} ms exceeded the limit of "
            f"{r.get('downtime_limit_s', 0.0) * 1000:.1f} ms"
        )
    if r.get("throughput_Bps"):
        lines.append(
            f"  throughput {format_bytes(r['throughput_Bps'])}/s overall, stop-copy "
            f"{format_bytes(r.get('stop_copy_throughput_Bps', 0.0))}/s"
        )
    if r.get("channel"):
        lines.append(f"  channel    {r['channel']} (a destination agent)")
    if r.get("phases"):
        lines.append("  phases     " + ", ".join(f"{k} {v:.3f} s" for k, v in r["phases"].items()))
    reinits = r.get("reinits", [])
    for e in reinits:
        lines.append(
            f"  REINIT     {e['device']} at {e['at_s']:.3f} s, iteration {e['iteration']} "
            f"({e['phase']}), {format_bytes(e['initial_bytes'])} new initial data: {e['handling']}"
        )
    if not reinits:
        lines.append("  REINIT     none seen")
    for d in r.get("devices", []):
        lines.append(
            f"  device     {d['name']}: precopy {format_bytes(d['precopy_bytes'])}, stop-copy "
            f"{format_bytes(d['stop_copy_bytes'])}, {d['reads']} reads ({d['empty_reads']} empty), "
            f"{d['acks']} switchover-acks, "
            f"precopy info {'v2' if d['precopy_info_v2'] else 'v1'}, "
            f"DMA logging {'yes' if d['dma_logging'] else 'no'}"
            + (f", data path {d['data_path']}" if d.get("data_path") else "")
        )
        if d.get("source_digest") and not r.get("verified"):  # verified: said once, below
            same = d["source_digest"] == d.get("destination_digest")
            lines.append(
                f"  digests    {d['source_digest']} -> {d.get('destination_digest') or '(none)'}"
                + (" equal" if same else " DIFFER")
            )
    if r.get("verified"):
        each = ", ".join(f"{d['name']} {d['source_digest']}" for d in r.get("devices", []))
        lines.append(f"  verified   digests equal (source and destination): {each}")
    elif r["status"] == "completed":
        lines.append("  verified   no")
    return lines

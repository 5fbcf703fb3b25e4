"""The migration report as text, for a person (`--json` prints all of it)."""

from __future__ import annotations

from typing import Any


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report_text(r: dict[str, Any]) -> str:
    """The migration report for a person (--json prints all of it)."""
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
    if r.get("throughput_Bps"):
        lines.append(
            f"  throughput {format_bytes(r['throughput_Bps'])}/s overall, stop-copy "
            f"{format_bytes(r.get('stop_copy_throughput_Bps', 0.0))}/s"
        )
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
        if d.get("source_digest"):
            same = d["source_digest"] == d.get("destination_digest")
            lines.append(
                f"  digests    {d['source_digest']} -> {d.get('destination_digest') or '(none)'}"
                + (" equal" if same else " DIFFER")
            )
    if r["status"] == "completed":
        lines.append("  verified   " + ("digests equal" if r.get("verified") else "no"))
    return "\n".join(lines)

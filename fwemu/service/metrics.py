"""Prometheus metrics of the firmware model, read from it at scrape time.

The model keeps plain counters (`fwemu/model/stats.py`); this collector turns
them into metric families when Prometheus scrapes, so the command path pays
for a dict update only.  Label sets stay bounded whatever the number of VFs:
per-VF series exist only when asked for, for at most `per_vf_limit` VFs.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from grpcsvc.collector import ScrapeCollector, per_item_series

from ..link.ifc import CmdStatus, FaultKind, QueryVhcaMigState, enum_name, opcode_name
from ..model.firmware import Firmware
from ..model.vf import Vf

# Series names, for dashboards and tests.
COMMANDS = "fwemu_commands"
SAVE_SECONDS = "fwemu_save_duration_seconds"
SAVED_BYTES = "fwemu_image_saved_bytes"
LOADED_BYTES = "fwemu_image_loaded_bytes"
SAVES_IN_FLIGHT = "fwemu_saves_in_flight"
VFS = "fwemu_vfs"
FAULTS = "fwemu_faults_injected"
RECONFIGURATIONS = "fwemu_reconfigurations"
VF_SAVED_BYTES = "fwemu_vf_image_saved_bytes"
VF_MIGRATION_STATE = "fwemu_vf_migration_state"


class FirmwareCollector(ScrapeCollector):
    def __init__(self, fw: Firmware, *, per_vf_limit: int = 0) -> None:
        self.fw = fw
        self.per_vf_limit = max(0, per_vf_limit)

    def collect(self) -> Iterator[Metric]:
        fw, stats = self.fw, self.fw.stats
        commands = CounterMetricFamily(
            COMMANDS, "Firmware commands answered, by opcode and outbox status.",
            labels=["opcode", "status"],
        )  # fmt: skip
        for (op, status), n in sorted(stats.commands.items()):
            commands.add_metric([opcode_name(op), enum_name(CmdStatus, status)], n)
        yield commands

        h = stats.save_seconds
        yield HistogramMetricFamily(
            SAVE_SECONDS,
            "Time from SAVE_VHCA_STATE to its completion (firmware clock).",
            buckets=[(_le(b), n) for b, n in h.cumulative()],
            sum_value=h.total,
        )
        yield CounterMetricFamily(
            SAVED_BYTES, "Image bytes written by SAVEs that completed OK.",
            value=stats.image_bytes_saved,
        )  # fmt: skip
        yield CounterMetricFamily(
            LOADED_BYTES, "Image bytes taken by LOAD_VHCA_STATE.", value=stats.image_bytes_loaded
        )
        vfs = list(fw.vfs.values())
        yield GaugeMetricFamily(
            SAVES_IN_FLIGHT, "SAVE_VHCA_STATE commands not yet completed.",
            value=sum(vf.save_in_flight is not None for vf in vfs),
        )  # fmt: skip
        by_state = dict.fromkeys(QueryVhcaMigState, 0)
        states = [(vf, vf.migration_state()) for vf in vfs]
        for _, st in states:
            by_state[st] += 1
        gauge = GaugeMetricFamily(
            VFS, "VFs by migration_state (QUERY_VHCA_MIGRATION_STATE).", labels=["migration_state"]
        )
        for st, n in by_state.items():
            gauge.add_metric([st.name], n)
        yield gauge
        faults = CounterMetricFamily(FAULTS, "Faults injected, by kind.", labels=["kind"])
        for kind in FaultKind:
            faults.add_metric([kind.name.lower()], stats.faults_injected.get(kind.name.lower(), 0))
        yield faults
        yield CounterMetricFamily(
            RECONFIGURATIONS, "Reconfigurations (new initial data while tracked) of all VFs.",
            value=stats.reconfigurations_retired + sum(vf.reconfigurations for vf in vfs),
        )  # fmt: skip
        if self.per_vf_limit:
            yield from self._per_vf(states[: self.per_vf_limit])

    @staticmethod
    def _per_vf(states: list[tuple[Vf, QueryVhcaMigState]]) -> Iterator[Metric]:
        return per_item_series(
            "vhca_id",
            (VF_SAVED_BYTES, "Image bytes saved, per VF (capped)."),
            (VF_MIGRATION_STATE, "migration_state per VF (capped), as its number."),
            ((str(vf.vhca_id), vf.saved_bytes, int(st)) for vf, st in states),
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)

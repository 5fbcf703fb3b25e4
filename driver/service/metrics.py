"""Prometheus metrics of the driver, read from its counters at scrape time.

Devices keep plain counters (`DeviceStats`, driver/mlx5/main.py), the
servicer counts errno answers, the audit counts findings; this collector
sums them over devices when Prometheus scrapes.  Counters stay monotonic
when a device goes away (its last counts are kept), and label sets stay
bounded: per-device series only when asked for, for at most
`per_device_limit` devices.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from fwemu.link.grpc import GrpcLink
from grpcsvc.collector import ScrapeCollector, per_item_series

from ..audit import RULES
from ..mlx5.latency import LatencyHistogram
from ..mlx5.main import DeviceStats, Mlx5VfDevice
from ..registry import Registered
from ..vfio.uapi import MigState
from .process import DataFd
from .servicer import VfioServicer

TRANSITIONS = "vfio_migration_state_transitions"
READ_BYTES = "vfio_migration_read_bytes"
WRITTEN_BYTES = "vfio_migration_written_bytes"
PRECOPY_INFO = "vfio_precopy_info"
REINIT_DETECTION = "vfio_reinit_detection_seconds"
READ_ENOMSG = "vfio_read_enomsg"
PRECOPY_DEFERRED = "vfio_precopy_deferred"
PRECOPY_DEFERRED_SECONDS = "vfio_precopy_deferred_seconds"
PRECOPY_WAITING = "vfio_precopy_waiting"
ERRORS = "vfio_errors"
SAVES = "vfio_save_images"
LOADS = "vfio_load_images"
DEVICES = "vfio_devices"
OPEN_DEVICES = "vfio_open_devices"
OPEN_STREAMS = "vfio_open_data_streams"
QUEUED_BYTES = "vfio_saving_queued_bytes"
AUDIT_FINDINGS = "vfio_audit_findings"
DEVICE_READ_BYTES = "vfio_device_migration_read_bytes"
DEVICE_STATE = "vfio_device_migration_state"
FIRMWARE_COMMANDS = "vfio_firmware_commands"
IOCTL_SECONDS = "vfio_ioctl_seconds"


@dataclass
class _Totals:
    """DeviceStats summed over devices."""

    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    ints: Counter[str] = field(default_factory=Counter)
    reinit_detection: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, s: DeviceStats) -> None:
        self.transitions.update(s.transitions)
        for name in _INT_FIELDS:
            self.ints[name] += getattr(s, name)
        self.reinit_detection.add(s.reinit_detection)

    def copy(self) -> _Totals:
        return _Totals(Counter(self.transitions), Counter(self.ints), self.reinit_detection.copy())


_INT_FIELDS = (
    "bytes_read",
    "bytes_written",
    "images_saved",
    "save_failures",
    "images_loaded",
    "precopy_info_v1",
    "precopy_info_v2",
    "reinits",
    "read_enomsg",
)


class DriverCollector(ScrapeCollector):
    def __init__(self, servicer: VfioServicer, *, per_device_limit: int = 0) -> None:
        self.servicer = servicer
        self.per_device_limit = max(0, per_device_limit)
        self._gone = _Totals()  # counts of devices no longer registered
        self._seen: dict[int, tuple[Mlx5VfDevice, DeviceStats]] = {}

    def _totals(self, devices: list[Mlx5VfDevice]) -> _Totals:
        live = {id(d): d for d in devices}
        for key, (_, stats) in list(self._seen.items()):
            if key not in live:
                self._gone.add(stats)
                del self._seen[key]
        for key, d in live.items():
            self._seen[key] = (d, d.stats)
        totals = self._gone.copy()
        for d in devices:
            totals.add(d.stats)
        return totals

    def collect(self) -> Iterator[Metric]:
        regs = [self.servicer.registry.devices[n] for n in sorted(self.servicer.registry.devices)]
        mvdevs = [r.mvdev for r in regs]
        t = self._totals(mvdevs)
        ints = t.ints
        tr = CounterMetricFamily(
            TRANSITIONS, "Device state changes, one per arc of the VFIO FSM.",
            labels=["from_state", "to_state"],
        )  # fmt: skip
        for (a, b), n in sorted(t.transitions.items()):
            tr.add_metric([a, b], n)
        yield tr
        yield CounterMetricFamily(
            READ_BYTES, "Migration data read from saving data fds.", value=ints["bytes_read"]
        )
        yield CounterMetricFamily(
            WRITTEN_BYTES, "Migration data written to resuming data fds.",
            value=ints["bytes_written"],
        )  # fmt: skip
        pi = CounterMetricFamily(
            PRECOPY_INFO, "VFIO_MIG_GET_PRECOPY_INFO answers, by version and REINIT.",
            labels=["version", "reinit"],
        )  # fmt: skip
        pi.add_metric(["v1", "false"], ints["precopy_info_v1"])
        pi.add_metric(["v2", "false"], ints["precopy_info_v2"] - ints["reinits"])
        pi.add_metric(["v2", "true"], ints["reinits"])
        yield pi
        h = t.reinit_detection
        yield HistogramMetricFamily(
            REINIT_DETECTION,
            "From the QUERY_VHCA_MIGRATION_STATE that first reported migration_state INIT "
            "to the VFIO_MIG_GET_PRECOPY_INFO answer carrying REINIT (seconds).",
            buckets=h.cumulative(),
            sum_value=h.total,
        )
        yield CounterMetricFamily(
            READ_ENOMSG, "Reads answered ENOMSG (PRE_COPY: nothing to read now).",
            value=ints["read_enomsg"],
        )  # fmt: skip
        priority = self.servicer.registry.priority
        yield CounterMetricFamily(
            PRECOPY_DEFERRED,
            "Precopy requests that waited for their principal's switchovers "
            "(--switchover-priority).",
            value=priority.deferred,
        )
        yield CounterMetricFamily(
            PRECOPY_DEFERRED_SECONDS,
            "The seconds those precopy requests waited, in all.",
            value=priority.deferred_s,
        )
        yield GaugeMetricFamily(
            PRECOPY_WAITING,
            "Precopy requests waiting now for their principal's switchovers.",
            value=priority.waiting,
        )
        errors = CounterMetricFamily(
            ERRORS, "Calls answered with an errno, by errno name.", labels=["errno"]
        )
        for name, n in sorted(self.servicer.errors_by_errno.items()):
            errors.add_metric([name], n)
        yield errors
        ioctls = HistogramMetricFamily(
            IOCTL_SECONDS,
            "DeviceFeature and PrecopyInfo calls, by ioctl (set_state is MIG_DEVICE_STATE SET) "
            "and transport (unary RPCs, or the Ioctl stream): seconds from the request to "
            "its answer, errnos included.",
            labels=["ioctl", "transport"],
        )
        for (op, transport), hist in sorted(self.servicer.ioctl_seconds.items()):
            ioctls.add_metric([op, transport], hist.cumulative(), sum_value=hist.total)
        yield ioctls
        saves = CounterMetricFamily(
            SAVES, "SAVE_VHCA_STATE completions the driver handled, by result.",
            labels=["result"],
        )  # fmt: skip
        saves.add_metric(["ok"], ints["images_saved"])
        saves.add_metric(["failed"], ints["save_failures"])
        yield saves
        yield CounterMetricFamily(
            LOADS, "Images loaded (LOAD_VHCA_STATE) from resuming streams.",
            value=ints["images_loaded"],
        )  # fmt: skip
        yield GaugeMetricFamily(DEVICES, "Registered VFIO devices.", value=len(regs))
        yield GaugeMetricFamily(
            OPEN_DEVICES, "Devices open by at least one client.",
            value=sum(r.core.open_count > 0 for r in regs),
        )  # fmt: skip
        streams = sum(
            isinstance(e, DataFd) for p in self.servicer.processes.values() for e in p.fds.values()
        )
        yield GaugeMetricFamily(OPEN_STREAMS, "Open data fds (saving and resuming).", value=streams)
        yield GaugeMetricFamily(
            QUEUED_BYTES, "Saved bytes queued in saving buffers, not yet read.",
            value=sum(_queued(d) for d in mvdevs),
        )  # fmt: skip
        audit = CounterMetricFamily(
            AUDIT_FINDINGS, "Orchestrator audit findings, by rule.", labels=["rule"]
        )
        counts = self.servicer.audit.counts
        for rule in sorted(RULES.keys() | counts.keys()):  # every rule, 0 until it fires
            audit.add_metric([rule], counts.get(rule, 0))
        yield audit
        yield self._firmware_commands()
        if self.per_device_limit:
            yield from self._per_device(regs[: self.per_device_limit])

    def _firmware_commands(self) -> Metric:
        """The commands the links to firmware processes sent: one command
        queue stream carries them all, so the gRPC client series count the
        stream, not the commands."""
        family = CounterMetricFamily(
            FIRMWARE_COMMANDS,
            "Firmware commands sent to firmware processes, by Firmware RPC and how they "
            "ended (OK: the firmware answered, with the outbox status as data; else the "
            "gRPC code).",
            labels=["command", "code"],
        )
        counts: Counter[tuple[str, str]] = Counter()
        for link in self.servicer.registry.links:
            if isinstance(link, GrpcLink):
                counts.update(link.commands)
        for (command, code), n in sorted(counts.items()):
            family.add_metric([command, code], n)
        return family

    @staticmethod
    def _per_device(regs: list[Registered]) -> Iterator[Metric]:
        return per_item_series(
            "device",
            (DEVICE_READ_BYTES, "Migration data read, per device (capped)."),
            (DEVICE_STATE, "The device's VFIO migration state, as its uAPI number (capped)."),
            (
                (r.core.name, r.mvdev.stats.bytes_read, int(MigState(r.mvdev.mig_state)))
                for r in regs
            ),
        )


def _queued(d: Mlx5VfDevice) -> int:
    migf = d.saving_migf
    return max(0, migf.max_pos - migf.f_pos) if migf is not None else 0

"""The orchestrator audit: what a client does that the emulation lets pass
but that would go wrong, or slow, on a real device.  Pure (no gRPC): the
driver and the service feed it what happens (hooks named after the
moment), it keeps findings per device, counts them by rule and publishes
each on the event bus.

Each rule names where it comes from (`RULES`), so a reader can check it
against the kernel or QEMU source.  A finding is reported once per data
stream (per reset for reset-with-open-stream): the log stays bounded and a
client looping on a mistake is told once.

Each finding belongs to the principal whose call (or whose data fd) it is
about ("" when it has no caller).  Read by a principal that does not see
everything, the log shows the findings of the devices it holds open, its
own and the driver's, as the event bus does (driver/events.py).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .events import CALLER, PRINCIPAL, EventBus, Finding, HolderOf

STOP_COPY_WITH_INITIAL_BYTES = "stop-copy-with-initial-bytes"
REINIT_WITHOUT_V2 = "reinit-without-v2"
READ_AFTER_EOF = "read-after-eof"
STREAM_LEFT_OPEN = "stream-left-open"
RESET_WITH_OPEN_STREAM = "reset-with-open-stream"

DOC = "vfio-mlx5-migration.md"

# rule id -> where it comes from
RULES: dict[str, str] = {
    STOP_COPY_WITH_INITIAL_BYTES: (
        "include/uapi/linux/vfio.h: struct vfio_precopy_info initial_bytes (move to STOP_COPY "
        "only once it reaches 0) and VFIO_PRECOPY_INFO_REINIT (re-evaluate readiness); QEMU "
        "hw/vfio/migration.c: switchover-ack re-armed on REINIT (DEV_INIT_DATA_SENT); "
        f"{DOC} §3.1, §3.3"
    ),
    REINIT_WITHOUT_V2: (
        "include/uapi/linux/vfio.h: VFIO_MIG_GET_PRECOPY_INFO flags and "
        "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2; include/linux/vfio.h: vfio_check_precopy_ioctl "
        f"(flags zeroed only after the opt-in); {DOC} §3.2 (the v1 flag echo)"
    ),
    READ_AFTER_EOF: (
        "include/uapi/linux/vfio.h: VFIO_DEVICE_STATE_STOP_COPY (read() returning 0 is the "
        "permanent end of stream); QEMU hw/vfio/migration.c: vfio_save_complete_precopy reads "
        f"until 0, then stops; {DOC} §4"
    ),
    STREAM_LEFT_OPEN: (
        "include/uapi/linux/vfio.h: enum vfio_device_mig_state (leaving the state ends the "
        "data transfer session of its data_fd); QEMU hw/vfio/migration.c: vfio_save_cleanup / "
        "vfio_load_cleanup close data_fd, vfio_migration_set_state fails on 'data_fd out of "
        f"sync'; {DOC} §1.4"
    ),
    RESET_WITH_OPEN_STREAM: (
        "include/uapi/linux/vfio.h: VFIO_DEVICE_RESET (the only asynchronous state change: the "
        "device returns to RUNNING, data transfer ends); drivers/vfio/pci/mlx5/main.c: "
        "mlx5vf_pci_aer_reset_done -> mlx5vf_disable_fds; QEMU hw/vfio/migration.c: "
        f"'data_fd out of sync'; {DOC} §1.4, §5.7"
    ),
}


@dataclass
class _Stream:
    """What the audit knows of one data stream (a migration file) of a device."""

    saving: bool = True
    client: str = ""  # who holds its data fd
    principal: str = ""  # ... and the principal of that client
    fd: int = -1
    fd_open: bool = False
    ended: str = ""  # what ended it ("STOP_COPY -> STOP", "VFIO_DEVICE_RESET"); "" while live
    reinit_initial: int = 0  # initial_bytes of the last REINIT answer (0: none yet)
    fw_init_end: int = 0  # v1: offset the firmware's new initial data may reach
    reported: set[str] = field(default_factory=set)


class AuditLog:
    """Findings per device (the newest `max_findings` of each), counts by rule."""

    def __init__(
        self,
        events: EventBus | None = None,
        *,
        max_findings: int = 256,
        clock: Callable[[], float] = time.time,
        holder_of: HolderOf | None = None,
    ) -> None:
        """`holder_of(device)`: the principal holding the device open (default:
        the event bus's), for readers that do not see everything."""
        self.events = events
        self.max_findings = max_findings
        self.clock = clock
        self._holder_of = holder_of
        self.counts: Counter[str] = Counter()  # by rule id, all devices
        # device -> (principal, finding), the newest max_findings
        self._findings: dict[str, deque[tuple[str, Finding]]] = {}
        self._device_counts: dict[str, Counter[str]] = {}
        # (device, principal) -> counts by rule
        self._principal_counts: dict[tuple[str, str], Counter[str]] = {}
        self._streams: dict[tuple[str, int], _Stream] = {}

    # --- reading ----------------------------------------------------------------------

    def holder_of(self, device: str) -> str | None:
        if self._holder_of is not None:
            return self._holder_of(device)
        return self.events.holder_of(device) if self.events is not None else None

    def _visible(self, device: str | None, principal: str) -> list[str]:
        """The devices (of `device`, or all) whose findings `principal` may read."""
        devices = self._findings if device is None else (device,)
        return [d for d in devices if self.holder_of(d) == principal]

    def findings(self, device: str | None = None, *, principal: str | None = None) -> list[Finding]:
        """A device's findings, or every device's, oldest first; those
        `principal` may read (None: all of them)."""
        if principal is None:
            if device is not None:
                return [f for _, f in self._findings.get(device, ())]
            every = (f for q in self._findings.values() for _, f in q)
            return sorted(every, key=lambda f: f.time)
        mine = (
            f
            for d in self._visible(device, principal)
            for p, f in self._findings.get(d, ())
            if p in (principal, "")
        )
        return sorted(mine, key=lambda f: f.time)

    def device_counts(
        self, device: str | None = None, *, principal: str | None = None
    ) -> Counter[str]:
        """Findings by rule, ever, of a device or all; those `principal` may
        read (None: all of them)."""
        if principal is None:
            if device is None:
                return Counter(self.counts)
            return Counter(self._device_counts.get(device, ()))
        out: Counter[str] = Counter()
        for d in self._visible(device, principal):
            for p in (principal, ""):
                out.update(self._principal_counts.get((d, p), ()))
        return out

    # --- reporting --------------------------------------------------------------------

    def _report(
        self,
        rule: str,
        device: str,
        message: str,
        *,
        stream: int = 0,
        rec: _Stream | None = None,
        client: str | None = None,
        principal: str | None = None,
    ) -> Finding | None:
        if rec is not None:
            if rule in rec.reported:
                return None
            rec.reported.add(rule)
        principal = PRINCIPAL.get() if principal is None else principal
        f = Finding(
            rule,
            device,
            self.clock(),
            CALLER.get() if client is None else client,
            message,
            RULES[rule],
            rec.fd if rec is not None and rec.fd_open else -1,
            stream,
        )
        q = self._findings.get(device)
        if q is None:
            q = self._findings[device] = deque(maxlen=self.max_findings)
        q.append((principal, f))
        self.counts[rule] += 1
        self._device_counts.setdefault(device, Counter())[rule] += 1
        self._principal_counts.setdefault((device, principal), Counter())[rule] += 1
        if self.events is not None:
            self.events.publish(
                device,
                f,
                client=f.client,
                principal=principal,
                data_fd=f.data_fd,
                stream=stream,
                at=f.time,
            )
        return f

    def _stream(self, device: str, stream: int) -> _Stream:
        rec = self._streams.get((device, stream))
        if rec is None:
            rec = self._streams[(device, stream)] = _Stream()
        return rec

    # --- the service's descriptor tables ---------------------------------------------

    def fd_opened(
        self, device: str, stream: int, *, saving: bool, client: str, fd: int, principal: str = ""
    ) -> None:
        rec = self._stream(device, stream)
        rec.saving, rec.client, rec.principal = saving, client, principal
        rec.fd, rec.fd_open = fd, True

    def fd_closed(self, device: str, stream: int) -> None:
        rec = self._streams.get((device, stream))
        if rec is None:
            return
        rec.fd_open = False
        if rec.ended:
            del self._streams[(device, stream)]

    def owner(self, device: str, stream: int) -> tuple[str, str, int] | None:
        """(principal, client, fd) of the stream's open data fd, if any."""
        rec = self._streams.get((device, stream))
        if rec is None or not rec.fd_open:
            return None
        return rec.principal, rec.client, rec.fd

    # --- the driver -------------------------------------------------------------------

    def stream_ended(self, device: str, stream: int, how: str) -> None:
        """The driver ended the stream's file (its state was left, a reset, a
        last close)."""
        rec = self._streams.get((device, stream))
        if rec is None:
            return
        if rec.fd_open:
            rec.ended = how
        else:
            del self._streams[(device, stream)]

    def state_change_requested(self, device: str, cur: str, target: str) -> None:
        """MIG_DEVICE_STATE SET: streams a state left earlier must be closed by now."""
        for (dev, stream), rec in self._streams.items():
            if dev != device or not rec.ended or not rec.fd_open:
                continue
            kind = "saving" if rec.saving else "resuming"
            self._report(
                STREAM_LEFT_OPEN,
                device,
                f"the {kind} data fd {rec.fd} (stream {stream}) was still open when the "
                f"device was asked to go {cur} -> {target}, though {rec.ended} ended its "
                "stream: the driver ended the file (reads and writes only get ENODEV) and a "
                "client keeping it may take it for the next session's fd (QEMU: 'data_fd out "
                "of sync'). Close a data fd once its state is left, as QEMU's "
                "vfio_save_cleanup / vfio_load_cleanup do.",
                stream=stream,
                rec=rec,
                client=rec.client,
                principal=rec.principal,
            )

    def precopy_answered(
        self,
        device: str,
        stream: int,
        *,
        v2: bool,
        flags: int,
        reinit: bool,
        initial_bytes: int,
        fw_init_end: int,
    ) -> None:
        """A VFIO_MIG_GET_PRECOPY_INFO answer (`flags` as answered: without
        the v2 opt-in, the caller's own) that may concern a rule: a REINIT,
        new initial data the firmware reported (ending at most at
        `fw_init_end` in the stream), or flags without the opt-in."""
        if not v2 and flags:
            self._report(
                REINIT_WITHOUT_V2,
                device,
                f"VFIO_MIG_GET_PRECOPY_INFO was called with flags {flags:#x} on a device "
                "without the MIG_PRECOPY_INFOv2 opt-in: v1 copies the caller's flags back "
                "unchanged, so a VFIO_PRECOPY_INFO_REINIT bit in the answer is the caller's own "
                "echo, not the driver's. Pass flags 0, and opt in (VFIO_DEVICE_FEATURE_SET | "
                "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2) before trusting REINIT.",
                stream=stream,
                rec=self._stream(device, stream),
            )
        if reinit:
            self._stream(device, stream).reinit_initial = initial_bytes
        elif fw_init_end:
            self._stream(device, stream).fw_init_end = fw_init_end

    def leaving_precopy(
        self, device: str, stream: int, *, arc: str, f_pos: int, initial_end: int, max_pos: int
    ) -> None:
        """PRE_COPY(_P2P) -> STOP_COPY, no SAVE in flight: the saving stream
        is at `f_pos`, the driver's initial data ends at `initial_end` (after
        a REINIT: the new initial data, with what was queued before it), what
        was saved at `max_pos`."""
        rec = self._streams.get((device, stream))
        if initial_end > f_pos and rec is not None and rec.reinit_initial:
            message = (
                f"{arc} with {initial_end - f_pos} bytes of the new initial data a REINIT "
                f"announced (VFIO_PRECOPY_INFO_REINIT, initial_bytes {rec.reinit_initial}) "
                "still unread: the device's new initial data now travels inside the downtime, "
                "and the destination never had it before the switchover. On REINIT replace "
                "the cached initial bytes, clear dirty, request a new switchover-ack, and read "
                "until PRECOPY_INFO reports initial_bytes 0 again before leaving PRE_COPY."
            )
        elif initial_end > f_pos:
            message = (
                f"{arc} with {initial_end - f_pos} initial bytes unread "
                "(VFIO_MIG_GET_PRECOPY_INFO would answer initial_bytes > 0): they now travel "
                "inside the downtime. Read the data fd until PRECOPY_INFO reports initial_bytes "
                "0 (with switchover-ack: until the destination acked it) before leaving PRE_COPY."
            )
        elif rec is not None and min(rec.fw_init_end, max_pos) > f_pos:
            left = min(rec.fw_init_end, max_pos) - f_pos
            message = (
                f"{arc} with up to {left} bytes of new initial data unread: the firmware "
                "reported new initial data (migration_state OPER_MIGRATION_INIT, e.g. a "
                "reconfiguration) that a client without the MIG_PRECOPY_INFOv2 opt-in sees "
                "only as dirty bytes. Opt in to MIG_PRECOPY_INFOv2 and handle "
                "VFIO_PRECOPY_INFO_REINIT."
            )
        else:
            return
        self._report(
            STOP_COPY_WITH_INITIAL_BYTES,
            device,
            message,
            stream=stream,
            rec=self._stream(device, stream),
        )

    def read_after_eof(self, device: str, stream: int) -> None:
        self._report(
            READ_AFTER_EOF,
            device,
            f"read on the saving data fd (stream {stream}) after it returned 0 in "
            "STOP_COPY: that end of stream is permanent, nothing more will come. Stop at the "
            "first read that returns 0, then move the device to STOP and close the fd.",
            stream=stream,
            rec=self._stream(device, stream),
        )

    def device_reset(self, device: str, live_streams: Iterable[int], io_in_progress: int) -> None:
        """VFIO_DEVICE_RESET, before it ends the device's live streams."""
        held = []
        for stream in live_streams:
            rec = self._streams.get((device, stream))
            if rec is not None and rec.fd_open:
                kind = "saving" if rec.saving else "resuming"
                held.append(f"{kind} stream {stream} (fd {rec.fd} of {rec.client})")
        if not held and not io_in_progress:
            return
        what = ", ".join(held) or "a data stream"
        busy = f", {io_in_progress} read/write in progress" if io_in_progress else ""
        self._report(
            RESET_WITH_OPEN_STREAM,
            device,
            f"VFIO_DEVICE_RESET with {what} open{busy}: the reset ends the transfer under "
            "its user (reads and writes then fail with ENODEV) and puts the device back to "
            "RUNNING. Close the data fd first (or end its state with a SET), then reset; "
            "aborting RESUMING is a reset too, after the fd is closed.",
        )

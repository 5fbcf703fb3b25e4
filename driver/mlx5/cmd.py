"""Firmware commands of the mlx5vf driver (drivers/vfio/pci/mlx5/cmd.c), on a
FirmwareLink: capabilities at probe, SUSPEND/RESUME_VHCA, the migration-state
query, the asynchronous SAVE_VHCA_STATE with its completion callback, and
LOAD_VHCA_STATE; plus the data buffers the firmware DMAs into."""

from __future__ import annotations

import asyncio
import enum
import errno
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fwemu.link.base import FirmwareLink, HostBuffer, LinkError
from fwemu.link.ifc import (
    HCA_CAP_OPMOD_GET_CUR,
    PAGE_SIZE,
    CapType,
    CmdResult,
    CmdStatus,
    HcaCapResult,
    QueryVhcaMigState,
    SaveCompletion,
    Syndrome,
)

from ..vfio.errors import VfioError

if TYPE_CHECKING:
    from .main import Mlx5VfDevice
    from .save import SaveFile

T = TypeVar("T")
R = TypeVar("R", bound=CmdResult)

# mlx5_cmd_check(): the errno a synchronous command returns for a status.
_CMD_STATUS_ERRNO = {
    CmdStatus.OK: 0,
    CmdStatus.INT_ERR: errno.EIO,
    CmdStatus.BAD_OP_ERR: errno.EINVAL,
    CmdStatus.BAD_PARAM_ERR: errno.EINVAL,
    CmdStatus.BAD_SYS_STATE_ERR: errno.EIO,
    CmdStatus.BAD_RES_ERR: errno.EINVAL,
    CmdStatus.RES_BUSY: errno.EBUSY,
    CmdStatus.NOT_READY: errno.EAGAIN,
    CmdStatus.LIM_ERR: errno.ENOMEM,
    CmdStatus.BAD_RES_STATE_ERR: errno.EINVAL,
    CmdStatus.IX_ERR: errno.EINVAL,
    CmdStatus.NO_RES_ERR: errno.EAGAIN,
    CmdStatus.BAD_QP_STATE_ERR: errno.EINVAL,
    CmdStatus.BAD_PKT_ERR: errno.EINVAL,
    CmdStatus.BAD_SIZE_OUTS_CQES_ERR: errno.EINVAL,
    CmdStatus.BAD_INP_LEN_ERR: errno.EIO,
    CmdStatus.BAD_OUTP_LEN_ERR: errno.EIO,
}


def cmd_status_to_err(status: int) -> int:
    """cmd_status_to_err() (mlx5 cmd.c): the errno for a firmware status (unknown -> EIO)."""
    try:
        return _CMD_STATUS_ERRNO[CmdStatus(status)]
    except ValueError:
        return errno.EIO


# enum mlx5vf query flags (cmd.h)
MLX5VF_QUERY_INC = 1 << 0
MLX5VF_QUERY_FINAL = 1 << 1
MLX5VF_QUERY_CLEANUP = 1 << 2

MAX_NUM_CHUNKS = 2
MAX_CHUNK_SIZE = 8 << 20
MAX_LOAD_SIZE = (1 << 32) - 1
# The SAVE size field is 32 bits; mlx5vf keeps a page below it.
MAX_SAVE_SIZE = (1 << 32) - PAGE_SIZE


class MigfState(enum.IntEnum):
    """enum mlx5_vf_migf_state (a new saving file starts at 0, unnamed)."""

    NONE = 0
    ERROR = 1
    PRE_COPY_ERROR = 2
    PRE_COPY = 3
    SAVE_STOP_COPY_CHUNK = 4
    COMPLETE = 5


# struct mlx5_vf_migration_header: le64 record_size, le32 flags, le32 tag
MIGRATION_HEADER = struct.Struct("<QII")
SIZEOF_MIGRATION_HEADER = MIGRATION_HEADER.size  # sizeof(struct mlx5_vf_migration_header): 16
MLX5_MIGF_HEADER_FLAGS_TAG_MANDATORY = 0
MLX5_MIGF_HEADER_FLAGS_TAG_OPTIONAL = 1 << 0
MLX5_MIGF_HEADER_TAG_FW_DATA = 0
MLX5_MIGF_HEADER_TAG_STOP_COPY_SIZE = 1 << 0
STOP_COPY_DATA = struct.Struct("<Q")  # struct mlx5_vf_migration_tag_stop_copy_data


# What one client's migration files may hold in data buffers (resume images,
# saving buffers, remote mkeys) across all devices: a real VF's stop-copy
# image with room to spare; past it an allocation is ENOMEM.
DEFAULT_BUFFER_BUDGET = 1 << 30


# A client of the budget: (principal, x-vfio-client), events.caller().
Client = tuple[str, str]


class BufferBudget:
    """Per-client accounting of the data buffers the driver holds for the
    client's files.  A charge that would take a client past `limit` is
    ENOMEM (as a kernel allocation under pressure) and charges nothing;
    other clients' accounts are untouched.  O(1) per charge."""

    def __init__(self, limit: int = DEFAULT_BUFFER_BUDGET) -> None:
        self.limit = limit
        self.held: dict[Client, int] = {}  # client -> bytes held (absent: 0)

    def available(self, client: Client) -> int:
        return self.limit - self.held.get(client, 0)

    def check(self, client: Client, length: int, *, freed: int = 0) -> None:
        """ENOMEM unless `length` more bytes (after `freed` are given back) fit.
        The message says neither: a resuming stream's record declares them."""
        if length - freed > self.available(client):
            raise VfioError(
                errno.ENOMEM,
                f"a data buffer past this client's {self.limit}-byte buffer budget",
            )

    def charge(self, client: Client, length: int) -> None:
        self.check(client, length)
        self.held[client] = self.held.get(client, 0) + length

    def release(self, client: Client, length: int) -> None:
        left = self.held.get(client, 0) - length
        if left > 0:
            self.held[client] = left
        else:
            self.held.pop(client, None)  # an idle client leaves no entry behind


def link_errno(e: LinkError) -> VfioError:
    """The firmware is unreachable: what the kernel sees when commands time out."""
    return VfioError(errno.EIO, f"firmware unreachable: {e}")


async def link_call(call: Callable[[], Awaitable[T]]) -> T:
    """A call on the firmware link (a command, or host memory the firmware
    reaches): an unreachable firmware is EIO."""
    try:
        return await call()
    except LinkError as e:
        raise link_errno(e) from None


class CmdError(VfioError):
    """A firmware command answered with a failed status: the errno is
    cmd_status_to_err's; the outbox status and syndrome stay as numbers."""

    def __init__(
        self, what: str, r: CmdResult, verb: str = "failed", *, diagnostic: bool = True
    ) -> None:
        """`diagnostic`: say the firmware's diagnostic too (not of a LOAD: it
        may quote the image, which is the client's stream)."""
        if diagnostic:
            said = f" {r.diagnostic}" if r.diagnostic else ""
        else:
            try:
                said = f" ({Syndrome(r.syndrome).name})"
            except ValueError:
                said = ""
        super().__init__(
            cmd_status_to_err(r.status),
            f"{what} {verb}: status {r.status:#x} syndrome {r.syndrome:#x}{said}",
        )
        self.status = r.status
        self.syndrome = r.syndrome

    @property
    def details(self) -> dict[str, str]:
        return {"status": str(self.status), "syndrome": str(self.syndrome)}


@dataclass(eq=False)
class DataBuffer:
    """struct mlx5_vhca_data_buffer: pages the firmware reaches through an mkey
    (`host`), or a header buffer the driver fills itself (dma_dir DMA_NONE,
    `local`).  A zero-length data buffer has neither."""

    allocated_length: int
    is_header: bool = False
    host: HostBuffer | None = None
    local: bytearray | None = field(default=None, repr=False)
    length: int = 0  # valid bytes
    start_pos: int = 0
    stop_copy_chunk_num: int = 0
    pre_copy_init_bytes_chunk: bool = False
    charged: bool = False  # `allocated_length` is on its file's client's BufferBudget

    @property
    def mkey(self) -> int:
        return self.host.mkey if self.host is not None else 0

    @property
    def view(self) -> memoryview:
        if self.host is not None:
            return self.host.view[: self.allocated_length]
        return memoryview(self.local if self.local is not None else b"")

    @property
    def npages(self) -> int:
        return -(-self.allocated_length // PAGE_SIZE)


@dataclass
class MigrationCaps:
    """What mlx5vf_cmd_set_migratable() learns from QUERY_HCA_CAP (the kernel
    keeps these in struct mlx5vf_pci_core_device)."""

    vhca_id: int = 0
    migrate_cap: bool = False
    chunk_mode: bool = False
    mig_state_cap: bool = False
    log_cap: bool = False  # adv_virtualization: dirty page tracking


class Commands:
    """mlx5vf_cmd_*() for one device.  `save_comp` is the saving file's binary
    semaphore (mlx5vf builds one from a completion): one SAVE at a time, and
    SUSPEND and incremental queries wait for the SAVE in flight."""

    def __init__(self, mvdev: Mlx5VfDevice) -> None:
        self.mvdev = mvdev

    @property
    def link(self) -> FirmwareLink:
        return self.mvdev.link

    @property
    def vhca_id(self) -> int:
        return self.mvdev.caps.vhca_id

    async def exec(
        self,
        what: str,
        call: Callable[[], Awaitable[R]],
        *,
        locked: bool = True,
        check: bool = True,
        verb: str = "failed",
        diagnostic: bool = True,
    ) -> R:
        """mlx5_cmd_exec(): every firmware command of the driver goes here.
        state_mutex is held (the mlx5vf_cmd_*() helpers' lockdep_assert_held;
        `locked=False` for the two that run without it); an unreachable
        firmware is EIO; a failed status is its errno (cmd_status_to_err) as
        a CmdError, unless the caller checks the status itself (`check=False`);
        the error says the firmware's diagnostic unless `diagnostic=False`."""
        assert not locked or self.mvdev.state_mutex.locked(), f"{what} without state_mutex"
        r = await link_call(call)
        if check and r.status != CmdStatus.OK:
            raise CmdError(what, r, verb, diagnostic=diagnostic)
        return r

    def _attached(self) -> None:
        if self.mvdev.mdev_detach:
            raise VfioError(errno.ENOTCONN, "the VF is detached from its PF")

    async def query_migration_caps(self, function_id: int) -> MigrationCaps:
        """mlx5vf_cmd_set_migratable(): migration needs cmd_hca_cap.migration, and in
        cap_2 migration_multi_load, migration_tracking_state (PRE_COPY is mandatory
        since 6.9) and migratable.  The kernel reads all but `migratable` from the
        PF; the emulated firmware sets them per VF, so the VF's own are read.
        Runs at probe, before the device has users: no state_mutex, and a
        failed status means "not migratable", not an error."""
        link = self.link

        async def query_hca_cap(cap_type: CapType) -> HcaCapResult:
            op_mod = (cap_type << 1) | HCA_CAP_OPMOD_GET_CUR
            return await self.exec(
                "QUERY_HCA_CAP",
                lambda: link.query_hca_cap(
                    op_mod=op_mod, other_function=True, function_id=function_id
                ),
                locked=False,
                check=False,
            )

        gen = await query_hca_cap(CapType.GENERAL_DEVICE)
        gen2 = await query_hca_cap(CapType.GENERAL_DEVICE_2)
        if not gen.ok or not gen2.ok:
            return MigrationCaps()
        return MigrationCaps(
            vhca_id=gen.vhca_id,
            migrate_cap=gen.migration
            and gen2.migration_multi_load
            and gen2.migration_tracking_state
            and gen2.migratable,
            chunk_mode=gen2.migration_in_chunks,
            mig_state_cap=gen2.migration_state,
            log_cap=gen.adv_virtualization,
        )

    async def suspend_vhca(self, op_mod: int) -> None:
        self._attached()
        migf = self.mvdev.saving_migf
        # PRE_COPY exposes the saving file while the device runs: never
        # suspend while a SAVE is in flight.
        if migf is not None:
            await migf.save_comp.acquire()
        try:
            await self.exec(
                "SUSPEND_VHCA", lambda: self.link.suspend_vhca(self.vhca_id, op_mod=op_mod)
            )
        finally:
            if migf is not None:
                migf.save_comp.release()

    async def resume_vhca(self, op_mod: int) -> None:
        self._attached()
        await self.exec("RESUME_VHCA", lambda: self.link.resume_vhca(self.vhca_id, op_mod=op_mod))

    async def query_vhca_migration_state(self, query_flags: int) -> tuple[int, int, int]:
        """(state_size, total_size, migration_state) as the kernel helper reports them."""
        self._attached()
        inc = bool(query_flags & MLX5VF_QUERY_INC)
        migf = self.mvdev.saving_migf
        if inc and migf is not None:
            # Wait until no SAVE is in flight.
            await migf.save_comp.acquire()
            migf.save_comp.release()
            if migf.state == MigfState.PRE_COPY_ERROR and not query_flags & MLX5VF_QUERY_CLEANUP:
                if not query_flags & MLX5VF_QUERY_FINAL:
                    return 0, 0, 0  # no firmware access: nothing incremental to read
                inc = False  # the final image is a full one
            elif migf.state == MigfState.ERROR:
                raise VfioError(errno.ENODEV, "saving file in error: incremental query blocked")
        chunk_mode = self.mvdev.caps.chunk_mode
        q = await self.exec(
            "QUERY_VHCA_MIGRATION_STATE",
            lambda: self.link.query_vhca_migration_state(
                self.vhca_id, op_mod=0, incremental=inc, chunk=chunk_mode
            ),
        )
        state_size = q.required_umem_size
        total = q.remaining_total_size if chunk_mode else state_size
        mig_state = q.migration_state if self.mvdev.caps.mig_state_cap else 0
        init = mig_state == QueryVhcaMigState.OPER_MIGRATION_INIT
        if init and migf is not None and migf.init_reported_at is None:
            migf.init_reported_at = time.monotonic()
        return state_size, total, mig_state

    async def save_vhca_state(
        self, migf: SaveFile, buf: DataBuffer, inc: bool, track: bool
    ) -> None:
        """mlx5vf_cmd_save_vhca_state(): issue an asynchronous SAVE; its
        completion is handled by migf.save_callback."""
        self._attached()
        await migf.save_comp.acquire()
        try:
            pre_copy_cleanup = (
                migf.state in (MigfState.PRE_COPY, MigfState.PRE_COPY_ERROR)
                and not track
                and not inc
            )
            if migf.state == MigfState.PRE_COPY_ERROR:
                inc = False  # after a PRE_COPY error only a full final image is taken
            stop_copy_chunk = not track and not pre_copy_cleanup
            header_buf: DataBuffer | None = None
            if stop_copy_chunk:
                idx = buf.stop_copy_chunk_num - 1 if buf.stop_copy_chunk_num else 0
                header_buf, migf.buf_header[idx] = migf.buf_header[idx], None
            if header_buf is None:
                header_buf = migf.get_header_buffer()
            if stop_copy_chunk:
                migf.state = MigfState.SAVE_STOP_COPY_CHUNK
            migf.inflight_save = True
            save = _SaveCommand(lambda c: migf.save_callback(c, buf, header_buf, stop_copy_chunk))
            res = await self.exec(
                "SAVE_VHCA_STATE",
                lambda: self.link.save_vhca_state(
                    self.vhca_id,
                    mkey=buf.mkey,
                    size=buf.allocated_length,
                    incremental=inc,
                    set_track=track,
                    callback=save.complete,
                ),
                verb="refused",
            )
            save.arm_timeout(self.mvdev.cmd_timeout, res.token, self.vhca_id)
        except BaseException:
            # Submission failed: no completion will come.
            migf.inflight_save = False
            if header_buf is not None:
                migf.put_data_buffer(header_buf)
            migf.wake()
            migf.save_comp.release()
            raise

    async def load_vhca_state(self, buf: DataBuffer) -> None:
        self._attached()
        if buf.allocated_length == 0:
            # mlx5vf_dma_data_buffer(): nothing to map
            raise VfioError(errno.EINVAL, "zero-length image with no buffer")
        assert buf.host is not None
        host = buf.host
        await link_call(lambda: self.link.dma_sync_for_device(host, 0, buf.length))
        await self.exec(
            "LOAD_VHCA_STATE",
            lambda: self.link.load_vhca_state(self.vhca_id, mkey=buf.mkey, size=buf.length),
            diagnostic=False,  # it may quote the image: the client's stream
        )

    async def function_level_reset(self) -> None:
        """The PCI core's FLR (vfio_pci_core_enable, VFIO_DEVICE_RESET): not
        an mlx5vf command, so it runs without state_mutex as in the kernel."""
        await self.exec(
            "function level reset",
            lambda: self.link.function_level_reset(self.vhca_id),
            locked=False,
        )


class _SaveCommand:
    """One asynchronous SAVE: its completion runs the callback exactly once,
    whether it comes from the firmware (possibly before the command's own
    answer) or from the command timeout, as mlx5_cmd_exec_cb reports a
    command the firmware never completed with -ETIMEDOUT."""

    def __init__(self, callback: Callable[[SaveCompletion], None]) -> None:
        self._callback = callback
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    def complete(self, c: SaveCompletion) -> None:
        if self._done:
            return  # a late answer after the timeout
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._callback(c)

    def arm_timeout(self, seconds: float, token: int, vhca_id: int) -> None:
        if self._done:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            seconds,
            lambda: self.complete(
                SaveCompletion(
                    token,
                    vhca_id,
                    -errno.ETIMEDOUT,
                    Syndrome.NONE,
                    0,
                    0,
                    loop.time(),
                    "command timed out",
                )
            ),
        )

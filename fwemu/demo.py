"""Firmware-level demo: migrate a VF's state by hand the way mlx5vf drives the
firmware, with a live workload and a reconfiguration during precopy, then load
every image into a second VF and compare digests."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

from .link.base import FirmwareLink, ScenarioLink
from .link.ifc import (
    PAGE_SIZE,
    CmdStatus,
    GiB,
    QueryVhcaMigState,
    ResumeOpMod,
    SaveCompletion,
    SuspendOpMod,
    VfConfig,
)


class DemoLink(FirmwareLink, ScenarioLink):
    """Both interfaces: what InProcessLink and GrpcLink implement."""


class DemoError(RuntimeError):
    pass


@dataclass
class Report:
    source: int = 0
    target: int = 0
    images: list[tuple[str, int]] = field(default_factory=list)
    init_seen: int = 0
    reconfigurations: int = 0
    source_digest: str = ""
    target_digest: str = ""
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return bool(self.source_digest) and self.source_digest == self.target_digest


def _check(what: str, r: object) -> None:
    status = getattr(r, "status", 0)
    if status != CmdStatus.OK:
        raise DemoError(f"{what} failed: status {status:#x}: {getattr(r, 'diagnostic', '')}")


async def save_image(
    link: FirmwareLink, vhca_id: int, *, size: int, incremental: bool, set_track: bool
) -> tuple[bytes, SaveCompletion]:
    """One SAVE_VHCA_STATE into a fresh buffer; returns the image bytes."""
    size = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
    buf = await link.alloc_buffer(size)
    try:
        done: asyncio.Future[SaveCompletion] = asyncio.get_running_loop().create_future()
        accepted = await link.save_vhca_state(
            vhca_id,
            mkey=buf.mkey,
            size=size,
            incremental=incremental,
            set_track=set_track,
            callback=done.set_result,
        )
        _check("SAVE_VHCA_STATE", accepted)
        c = await asyncio.wait_for(done, 60)
        _check("SAVE_VHCA_STATE completion", c)
        await link.dma_sync_for_cpu(buf, 0, c.actual_image_size)
        return bytes(buf.view[: c.actual_image_size]), c
    finally:
        await link.free_buffer(buf)


async def load_image(link: FirmwareLink, vhca_id: int, image: bytes) -> None:
    buf = await link.alloc_buffer(len(image))
    try:
        buf.view[: len(image)] = image
        await link.dma_sync_for_device(buf, 0, len(image))
        _check(
            "LOAD_VHCA_STATE", await link.load_vhca_state(vhca_id, mkey=buf.mkey, size=len(image))
        )
    finally:
        await link.free_buffer(buf)


async def migrate_by_hand(
    link: DemoLink, src: int, dst: int, *, iterations: int = 8, interval: float = 0.02
) -> Report:
    rep = Report(source=src, target=dst)
    t0 = time.monotonic()
    images: list[bytes] = []

    async def save(kind: str, size: int, inc: bool, track: bool) -> None:
        image, _ = await save_image(link, src, size=size, incremental=inc, set_track=track)
        images.append(image)
        rep.images.append((kind, len(image)))

    # RUNNING -> PRE_COPY: full image, tracking on (10% headroom as mlx5vf).
    q = await link.query_vhca_migration_state(src)
    _check("QUERY_VHCA_MIGRATION_STATE", q)
    await save("full", q.required_umem_size * 11 // 10, False, True)
    for i in range(iterations):
        await asyncio.sleep(interval)
        if i == iterations // 3:
            await link.reconfigure(src)  # the guest adds a QP during precopy
            rep.reconfigurations += 1
        q = await link.query_vhca_migration_state(src, incremental=True)
        _check("QUERY_VHCA_MIGRATION_STATE", q)
        if q.migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT:
            rep.init_seen += 1
        await save(
            "init" if q.migration_state == QueryVhcaMigState.OPER_MIGRATION_INIT else "dirty",
            q.required_umem_size,
            True,
            True,
        )
    # PRE_COPY -> PRE_COPY_P2P -> STOP_COPY: quiesce, then the final incremental image.
    _check("SUSPEND_VHCA", await link.suspend_vhca(src, op_mod=SuspendOpMod.SUSPEND_INITIATOR))
    _check("SUSPEND_VHCA", await link.suspend_vhca(src, op_mod=SuspendOpMod.SUSPEND_RESPONDER))
    q = await link.query_vhca_migration_state(src, incremental=True)
    _check("QUERY_VHCA_MIGRATION_STATE", q)
    await save("final", q.required_umem_size, True, False)
    rep.source_digest = await link.digest(src)
    # Destination: RUNNING -> RUNNING_P2P -> STOP -> RESUMING, load, -> RUNNING.
    _check("SUSPEND_VHCA", await link.suspend_vhca(dst, op_mod=SuspendOpMod.SUSPEND_INITIATOR))
    _check("SUSPEND_VHCA", await link.suspend_vhca(dst, op_mod=SuspendOpMod.SUSPEND_RESPONDER))
    for image in images:
        await load_image(link, dst, image)
    rep.target_digest = await link.digest(dst)
    _check("RESUME_VHCA", await link.resume_vhca(dst, op_mod=ResumeOpMod.RESUME_RESPONDER))
    _check("RESUME_VHCA", await link.resume_vhca(dst, op_mod=ResumeOpMod.RESUME_INITIATOR))
    rep.seconds = time.monotonic() - t0
    return rep


async def run_demo(args: argparse.Namespace) -> int:
    link: DemoLink
    if args.firmware:
        from grpcsvc.tls import client_tls_from_args

        from .link.grpc import GrpcLink

        # It creates VFs: with mutual TLS, an admin's certificate (README).
        tls = client_tls_from_args(args)
        link = await GrpcLink.connect(args.firmware, tls=tls)  # type: ignore[assignment]
    else:
        from .link.inproc import InProcessLink
        from .model.clock import LoopClock
        from .model.firmware import Firmware

        link = InProcessLink(Firmware(LoopClock(), seed=args.seed))  # type: ignore[assignment]
    try:
        cfg = VfConfig(
            size=args.size,
            dirty_bytes_per_s=args.dirty_rate,
            save_bandwidth=4 * GiB,
            save_latency_s=0.001,
        )
        src, dst = await link.create_vfs(2, cfg)
        rep = await migrate_by_hand(link, src.vhca_id, dst.vhca_id)
        for v in (src, dst):
            await link.remove_vf(v.vhca_id)
    finally:
        await link.close()
    if args.json:
        print(json.dumps({**rep.__dict__, "equal": rep.equal}, indent=2))
    else:
        print(
            f"migrated vhca {rep.source} -> vhca {rep.target} in {rep.seconds:.3f}s "
            f"({len(rep.images)} images, {sum(n for _, n in rep.images)} bytes)"
        )
        for kind, n in rep.images:
            print(f"  {kind:<6} {n:>12} bytes")
        print(
            f"  reconfigurations {rep.reconfigurations}, migration_state INIT seen "
            f"{rep.init_seen} time(s)"
        )
        print(f"source digest {rep.source_digest}")
        print(f"target digest {rep.target_digest}")
        print("digests equal" if rep.equal else "DIGESTS DIFFER")
    return 0 if rep.equal else 1

"""Model values <-> protobuf messages, used by the servicers and by GrpcLink."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from ..api.v1 import firmware_pb2 as fpb
from ..api.v1 import scenario_pb2 as spb
from ..link.ifc import (
    CmdResult,
    Fault,
    FaultKind,
    HcaCapResult,
    PageTrackResult,
    QueryResult,
    SaveAccepted,
    SaveCompletion,
    VfCaps,
    VfConfig,
    VfInfo,
)

_CAP_FIELDS = [f.name for f in fields(VfCaps)]
_CONFIG_FIELDS = [f.name for f in fields(VfConfig) if f.name != "caps"]


# --- firmware results --------------------------------------------------------


def cmd_to_pb(r: CmdResult) -> fpb.CommandResponse:
    return fpb.CommandResponse(status=r.status, syndrome=r.syndrome, diagnostic=r.diagnostic)


def cmd_from_pb(m: Any) -> CmdResult:
    return CmdResult(status=m.status, syndrome=m.syndrome, diagnostic=m.diagnostic)


def hca_cap_to_pb(r: HcaCapResult) -> fpb.QueryHcaCapResponse:
    return fpb.QueryHcaCapResponse(
        status=r.status,
        syndrome=r.syndrome,
        diagnostic=r.diagnostic,
        cmd_hca_cap=fpb.CmdHcaCap(
            vhca_id=r.vhca_id, migration=r.migration, adv_virtualization=r.adv_virtualization
        ),
        cmd_hca_cap_2=fpb.CmdHcaCap2(
            migratable=r.migratable,
            migration_multi_load=r.migration_multi_load,
            migration_tracking_state=r.migration_tracking_state,
            migration_in_chunks=r.migration_in_chunks,
            migration_state=r.migration_state,
        ),
    )


def hca_cap_from_pb(m: fpb.QueryHcaCapResponse, op_mod: int) -> HcaCapResult:
    g, g2 = m.cmd_hca_cap, m.cmd_hca_cap_2
    return HcaCapResult(
        status=m.status,
        syndrome=m.syndrome,
        diagnostic=m.diagnostic,
        vhca_id=g.vhca_id,
        migration=g.migration,
        adv_virtualization=g.adv_virtualization,
        migratable=g2.migratable,
        migration_multi_load=g2.migration_multi_load,
        migration_tracking_state=g2.migration_tracking_state,
        migration_in_chunks=g2.migration_in_chunks,
        migration_state=g2.migration_state,
        cap_type=op_mod >> 1,
    )


def query_to_pb(r: QueryResult) -> fpb.QueryVhcaMigrationStateResponse:
    return fpb.QueryVhcaMigrationStateResponse(
        status=r.status,
        syndrome=r.syndrome,
        diagnostic=r.diagnostic,
        migration_state=r.migration_state,
        required_umem_size=r.required_umem_size,
        remaining_total_size=r.remaining_total_size,
    )


def query_from_pb(m: fpb.QueryVhcaMigrationStateResponse) -> QueryResult:
    return QueryResult(
        status=m.status,
        syndrome=m.syndrome,
        diagnostic=m.diagnostic,
        migration_state=m.migration_state,
        required_umem_size=m.required_umem_size,
        remaining_total_size=m.remaining_total_size,
    )


def save_to_pb(r: SaveAccepted) -> fpb.SaveVhcaStateResponse:
    return fpb.SaveVhcaStateResponse(
        status=r.status, syndrome=r.syndrome, diagnostic=r.diagnostic, token=r.token
    )


def save_from_pb(m: fpb.SaveVhcaStateResponse) -> SaveAccepted:
    return SaveAccepted(
        status=m.status, syndrome=m.syndrome, diagnostic=m.diagnostic, token=m.token
    )


def completion_to_pb(c: SaveCompletion) -> fpb.Completion:
    return fpb.Completion(
        token=c.token,
        vhca_id=c.vhca_id,
        opcode=c.opcode,
        status=c.status,
        syndrome=c.syndrome,
        actual_image_size=c.actual_image_size,
        next_required_umem_size=c.next_required_umem_size,
        timestamp=c.timestamp,
        diagnostic=c.diagnostic,
    )


def completion_from_pb(m: fpb.Completion) -> SaveCompletion:
    return SaveCompletion(
        token=m.token,
        vhca_id=m.vhca_id,
        status=m.status,
        syndrome=m.syndrome,
        actual_image_size=m.actual_image_size,
        next_required_umem_size=m.next_required_umem_size,
        timestamp=m.timestamp,
        diagnostic=m.diagnostic,
        opcode=m.opcode,
    )


def page_track_to_pb(r: PageTrackResult) -> fpb.PageTrackerResponse:
    return fpb.PageTrackerResponse(
        status=r.status,
        syndrome=r.syndrome,
        diagnostic=r.diagnostic,
        obj_id=r.obj_id,
        dirty_addresses=r.dirty,
    )


def page_track_from_pb(m: fpb.PageTrackerResponse) -> PageTrackResult:
    return PageTrackResult(
        status=m.status,
        syndrome=m.syndrome,
        diagnostic=m.diagnostic,
        obj_id=m.obj_id,
        dirty=list(m.dirty_addresses),
    )


# --- scenario values -----------------------------------------------------------


def caps_to_pb(c: VfCaps) -> spb.Caps:
    return spb.Caps(**{n: getattr(c, n) for n in _CAP_FIELDS})


def caps_overlay(base: VfCaps, m: spb.Caps) -> VfCaps:
    return replace(base, **{n: getattr(m, n) for n in _CAP_FIELDS if m.HasField(n)})  # type: ignore[arg-type]


def config_to_pb(c: VfConfig) -> spb.VfConfig:
    values = {n: getattr(c, n) for n in _CONFIG_FIELDS if getattr(c, n) is not None}
    return spb.VfConfig(**values, caps=caps_to_pb(c.caps))


def config_changes(m: spb.VfConfig) -> dict[str, Any]:
    """The fields a request sets (caps as a spb.Caps to overlay)."""
    changes: dict[str, Any] = {
        n: getattr(m, n)
        for n in _CONFIG_FIELDS
        if m.HasField(n)  # type: ignore[arg-type]
    }
    return changes


def config_overlay(base: VfConfig, m: spb.VfConfig) -> VfConfig:
    return replace(base, **config_changes(m), caps=caps_overlay(base.caps, m.caps))


def vf_info_to_pb(v: VfInfo) -> spb.VfInfo:
    c = v.config
    return spb.VfInfo(
        vf_id=v.vf_id,
        vhca_id=v.vhca_id,
        function_id=v.function_id,
        size=c.size,
        seed=v.seed,
        dirty_bytes_per_s=c.dirty_bytes_per_s,
        save_bandwidth=c.save_bandwidth,
        save_latency_s=c.save_latency_s,
        chunk_size=c.chunk_size,
        reconfig_bytes=c.reconfig_bytes,
        caps=caps_to_pb(c.caps),
        initiator_suspended=v.initiator_suspended,
        responder_suspended=v.responder_suspended,
        tracking=v.tracking,
        migration_state=v.migration_state,
        num_objects=v.num_objects,
        saved_bytes=v.saved_bytes,
        loaded_bytes=v.loaded_bytes,
        reconfigurations=v.reconfigurations,
        save_in_flight=v.save_in_flight,
    )


def vf_info_from_pb(m: spb.VfInfo) -> VfInfo:
    caps = VfCaps(**{n: getattr(m.caps, n) for n in _CAP_FIELDS})
    config = VfConfig(
        size=m.size,
        seed=m.seed,
        dirty_bytes_per_s=m.dirty_bytes_per_s,
        save_bandwidth=m.save_bandwidth,
        save_latency_s=m.save_latency_s,
        chunk_size=m.chunk_size,
        reconfig_bytes=m.reconfig_bytes,
        caps=caps,
    )
    return VfInfo(
        vf_id=m.vf_id,
        vhca_id=m.vhca_id,
        function_id=m.function_id,
        config=config,
        initiator_suspended=m.initiator_suspended,
        responder_suspended=m.responder_suspended,
        tracking=m.tracking,
        migration_state=m.migration_state,
        num_objects=m.num_objects,
        saved_bytes=m.saved_bytes,
        loaded_bytes=m.loaded_bytes,
        reconfigurations=m.reconfigurations,
        save_in_flight=m.save_in_flight,
        seed=m.seed,
    )


def fault_to_pb(f: Fault) -> spb.Fault:
    return spb.Fault(
        kind=spb.FaultKind.ValueType(int(f.kind)),
        opcode=f.opcode,
        status=f.status,
        syndrome=f.syndrome,
        delay_s=f.delay_s,
        count=f.count,
        in_completion=f.in_completion,
    )


def fault_from_pb(m: spb.Fault) -> Fault:
    try:
        kind = FaultKind(m.kind)
    except ValueError:
        raise ValueError(f"unknown fault kind {m.kind}") from None
    return Fault(
        kind,
        opcode=m.opcode,
        status=m.status,
        syndrome=m.syndrome,
        delay_s=m.delay_s,
        count=m.count or 1,
        in_completion=m.in_completion,
    )

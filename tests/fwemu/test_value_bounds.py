"""Every numeric value of the Scenario API, of scenario files and of VfConfig
has a bound: NaN, ±inf, negatives and absurd values are refused with a message
naming the field and its range, and the refusal changes nothing (issue 11, item 3)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwemu.api.v1 import scenario_pb2 as spb
from fwemu.api.v1 import scenario_pb2_grpc as sgrpc
from fwemu.link.base import LinkError
from fwemu.link.ifc import Fault, FaultKind, Opcode, VfConfig
from fwemu.link.scenario_requests import (
    MAX_LIST_FUNCTION_IDS,
    MAX_RECONFIG_OBJECTS,
    MAX_SCENARIO_TEXT,
    AdvanceClockIn,
    ApplyScenarioIn,
    CreateVfsIn,
    ListVfsIn,
    ReconfigureIn,
)
from fwemu.model import Firmware, VirtualClock
from fwemu.scenario import MAX_YAML_DEPTH, ScenarioError, parse_scenario
from fwemu.service.server import FirmwareServer
from grpcsvc.errors import error_info
from tests.support.fwemu import Harness

# Values no field takes: not finite, negative, or far beyond any bound.
ABSURD = [math.nan, math.inf, -math.inf, -1, -1.5, 1 << 50, 1 << 70, 1e300]
INT_FIELDS = ["size", "dirty_bytes_per_s", "save_bandwidth", "chunk_size", "reconfig_bytes"]

absurd_numbers = st.one_of(
    st.sampled_from(ABSURD),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 <= x <= 1 << 36),
    st.integers(max_value=-1),
    st.integers(min_value=(1 << 36) + 1),
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*INT_FIELDS, "save_latency_s"]), value=absurd_numbers)
def test_vf_config_refuses_absurd_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be between"):
        replace(VfConfig(), **{field: value}).validate()


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=st.floats(min_value=4096, max_value=1 << 20))
def test_vf_config_integer_fields_refuse_floats(field: str, value: float) -> None:
    """A float in an integer field (a NaN's cousin through in-process calls) is refused."""
    with pytest.raises(ValueError, match=f"^{field} must be between .* \\(an integer\\)"):
        replace(VfConfig(), **{field: value}).validate()  # type: ignore[arg-type]


def test_dirty_rate_is_bounded_at_64_gib_per_s() -> None:
    replace(VfConfig(), dirty_bytes_per_s=VfConfig.MAX_RATE).validate()
    with pytest.raises(ValueError, match="dirty_bytes_per_s must be between 0 and 68719476736"):
        replace(VfConfig(), dirty_bytes_per_s=1 << 50).validate()


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([FaultKind.DELAY, FaultKind.DELAY_COMPLETION]),
    delay=st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, 3600.5, 1e300]),
        st.floats(max_value=-1e-9),
    ),
)
def test_fault_delay_is_finite_and_bounded(kind: FaultKind, delay: float) -> None:
    with pytest.raises(ValueError, match="delay_s"):
        Fault(kind, Opcode.SUSPEND_VHCA, delay_s=delay).validate()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"count": 0}, "count"),
        ({"count": 1 << 40}, "count"),
        ({"count": 1.5}, "count"),
        ({"status": 0x100}, "status"),
        ({"status": -1}, "status"),
        ({"syndrome": 1 << 32}, "syndrome"),
        ({"syndrome": -1}, "syndrome"),
    ],
)
def test_fault_fields_have_ranges(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be between"):
        Fault(FaultKind.FAIL, Opcode.SUSPEND_VHCA, **fields).validate()


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (ReconfigureIn(1, at_time=math.nan), "at_time"),
        (ReconfigureIn(1, at_time=math.inf), "at_time"),
        (ReconfigureIn(1, at_time=-1.0), "at_time"),
        (ReconfigureIn(1, after_saved_bytes=-1), "after_saved_bytes"),
        (ReconfigureIn(1, after_saved_bytes=1 << 64), "after_saved_bytes"),
        (ReconfigureIn(1, objects=(("QP", 0),)), "objects\\[0\\].size"),
        (ReconfigureIn(1, objects=(("QP", 1 << 40),)), "objects\\[0\\].size"),
        (ReconfigureIn(1, objects=(("QP", 1),) * (MAX_RECONFIG_OBJECTS + 1)), "objects"),
        (AdvanceClockIn(math.nan), "seconds"),
        (AdvanceClockIn(math.inf), "seconds"),
        (AdvanceClockIn(-1.0), "seconds"),
        (AdvanceClockIn(1e12), "seconds"),
        (CreateVfsIn(0), "count"),
        (CreateVfsIn(1 << 20), "count"),
        (CreateVfsIn(1, replace(VfConfig(), save_latency_s=math.nan)), "save_latency_s"),
        (ApplyScenarioIn(" " * (MAX_SCENARIO_TEXT + 1)), "text"),
        (ListVfsIn((1,) * (MAX_LIST_FUNCTION_IDS + 1)), "function_ids"),
    ],
)
def test_requests_name_the_field_out_of_range(req: Any, field: str) -> None:
    """Firmware.control checks every request before it acts: a refusal changes nothing."""
    fw = Firmware(VirtualClock(), seed=1)
    fw.create_vfs(1)
    before = (fw.list_vfs(), fw.now(), [list(vf.triggers) for vf in fw.vfs.values()])
    with pytest.raises(ValueError, match=f"^{field}"):
        fw.control(req)
    assert (fw.list_vfs(), fw.now(), [list(vf.triggers) for vf in fw.vfs.values()]) == before


async def test_the_scenario_api_refuses_absurd_values(h: Harness) -> None:
    """Through both links (in process, gRPC): the same refusal, nothing changed."""
    vhca = await h.vf(size=64 * 1024, dirty_bytes_per_s=0)
    with pytest.raises(LinkError, match="dirty_bytes_per_s must be between"):
        await h.link.configure_vf(vhca, dirty_bytes_per_s=1 << 50)
    with pytest.raises(LinkError, match="delay_s"):
        await h.link.inject_fault(
            vhca, Fault(FaultKind.DELAY, Opcode.SUSPEND_VHCA, delay_s=math.inf)
        )
    with pytest.raises(LinkError, match="at_time"):
        await h.link.reconfigure(vhca, at_time=math.nan)
    with pytest.raises(LinkError, match="seconds"):
        await h.advance(math.nan)
    with pytest.raises(LinkError, match="size must be between"):
        await h.vf(size=1 << 50)
    info = await h.info(vhca)
    assert info.config.dirty_bytes_per_s == 0 and len(await h.link.list_vfs()) == 1
    assert await h.link.clear_faults(vhca) == 0


# --- scenario files -------------------------------------------------------------------


def _laughs(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines)


def test_a_billion_laughs_is_refused_before_it_expands() -> None:
    start = time.perf_counter()
    with pytest.raises(ScenarioError, match="YAML nodes"):
        parse_scenario(_laughs(9))  # 10^9 nodes once expanded
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("events: " + "[" * (MAX_YAML_DEPTH + 1) + "]" * (MAX_YAML_DEPTH + 1), "deeper than"),
        ("\n".join("  " * i + "- " for i in range(200)), "deeper than"),
        ("a: &a [*a]", "recursive"),
        ("x" * (MAX_SCENARIO_TEXT + 1), "at most"),
        ("events: [{vf: 1, at: .nan, reconfigure: {}}]", "events.0.at"),
        ("events: [{vf: 1, at: .inf, reconfigure: {}}]", "events.0.at"),
        ("events: [{vf: 1, after_saved_bytes: 2000PiB, reconfigure: {}}]", "after_saved_bytes"),
        ("events: [{vf: 1, fault: {kind: delay, opcode: SUSPEND_VHCA, delay_s: .inf}}]", "delay_s"),
        ("events: [{vf: 1, fault: {kind: fail, count: 99999999999}}]", "count"),
        ("defaults: {save_latency_s: .nan}", "save_latency_s"),
        ("events: [" + ", ".join(["{vf: 1, reconfigure: {}}"] * 4097) + "]", "events"),
    ],
)
def test_scenario_files_are_bounded(text: str, why: str) -> None:
    with pytest.raises(ScenarioError, match=why):
        parse_scenario(text)


def test_applying_an_absurd_rate_changes_nothing() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    with pytest.raises(ScenarioError, match="dirty_bytes_per_s must be between"):
        fw.apply_scenario("vfs: [{count: 1, dirty_bytes_per_s: 1PiB}]")
    assert not fw.vfs


def test_events_times_vfs_is_bounded() -> None:
    fw = Firmware(VirtualClock(), seed=1)
    text = (
        "vfs: [{count: 64, size: 4KiB}]\nevents: ["
        + ", ".join(["{vf: all, reconfigure: {}}"] * 2048)
        + "]"
    )
    with pytest.raises(ScenarioError, match="actions"):
        fw.apply_scenario(text)
    assert not fw.vfs


# --- over gRPC, raw messages a careless client may send -----------------------------


@pytest.fixture
async def stub() -> AsyncIterator[sgrpc.ScenarioAsyncStub]:
    srv = FirmwareServer(Firmware(VirtualClock(), seed=1))
    port = await srv.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield sgrpc.ScenarioStub(ch)
    await srv.stop()


@pytest.mark.grpc
async def test_grpc_refusals_are_invalid_argument_naming_the_field(
    stub: sgrpc.ScenarioAsyncStub,
) -> None:
    [vf] = (await stub.CreateVfs(spb.CreateVfsRequest(count=1))).vfs
    calls: list[tuple[Awaitable[Any], str]] = [
        (stub.CreateVfs(spb.CreateVfsRequest(count=1 << 20)), "count"),
        (stub.CreateVfs(spb.CreateVfsRequest(config=spb.VfConfig(save_latency_s=math.nan))),
         "save_latency_s"),
        (stub.ConfigureVf(spb.ConfigureVfRequest(
            vhca_id=vf.vhca_id, config=spb.VfConfig(dirty_bytes_per_s=1 << 50))),
         "dirty_bytes_per_s"),
        (stub.Reconfigure(spb.ReconfigureRequest(vhca_id=vf.vhca_id, at_time=math.inf)),
         "at_time"),
        (stub.InjectFault(spb.InjectFaultRequest(vhca_id=vf.vhca_id, fault=spb.Fault(
            kind=spb.FAULT_KIND_DELAY, opcode=Opcode.SUSPEND_VHCA, delay_s=math.nan))), "delay_s"),
        (stub.AdvanceClock(spb.AdvanceClockRequest(seconds=math.nan)), "seconds"),
        (stub.ApplyScenario(spb.ApplyScenarioRequest(text=_laughs(9))), "YAML nodes"),
        # One id more than there can be: refused before a set of them is made
        # (up to the 64 MiB message limit, 64M of them would cost gigabytes).
        (stub.ListVfs(spb.ListVfsRequest(function_ids=[0] * (MAX_LIST_FUNCTION_IDS + 1))),
         "function_ids"),
    ]  # fmt: skip
    for call, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        info = error_info(e.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT, (field, info)
        assert field in info.message and info.reason.startswith("INVALID_")
    assert len((await stub.ListVfs(spb.ListVfsRequest())).vfs) == 1
    every_id = spb.ListVfsRequest(function_ids=range(MAX_LIST_FUNCTION_IDS))  # the most: fine
    assert [v.vhca_id for v in (await stub.ListVfs(every_id)).vfs] == [vf.vhca_id]
    assert (await stub.GetClock(spb.ClockRequest())).now == 0.0


def test_the_service_defaults_are_checked_like_any_config() -> None:
    """What `fwemu serve --dirty-bytes-per-s ...` builds goes through the same bounds."""
    from fwemu.scenario import build_firmware

    with pytest.raises(ScenarioError, match="dirty_bytes_per_s must be between"):
        build_firmware(
            VirtualClock(), replace(VfConfig(), dirty_bytes_per_s=1 << 50), seed=1,
            scenario=None, vfs=1,
        )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(
        absurd_numbers,
        st.floats(min_value=1000.001, max_value=1e12),
        st.floats(max_value=-1e-9),
    )
)
def test_reconfig_rate_is_finite_and_at_most_1000_per_s(value: Any) -> None:
    """VfConfig.reconfig_rate_per_s (automatic reconfigurations, issue 13):
    0 to 1000 per second, NaN and ±inf refused with the field and its range."""
    with pytest.raises(ValueError, match=r"^reconfig_rate_per_s must be between 0 and 1000"):
        replace(VfConfig(), reconfig_rate_per_s=value).validate()
    replace(VfConfig(), reconfig_rate_per_s=1000.0).validate()
    with pytest.raises(ScenarioError, match="reconfig_rate_per_s"):
        parse_scenario(f"defaults: {{reconfig_rate_per_s: {value!r}}}".replace("nan", ".nan"))

"""The shard map (driver/shards.py), shard naming, `fwemu --shard auto`'s
hostname rule, and a driver registry over several firmwares (in process)."""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver.registry import DeviceRegistry
from driver.shards import (
    MAX_SHARDS,
    SHARDS_ENV,
    ShardMap,
    ShardSpecError,
    from_addresses,
    from_template,
    parse_pci_name,
    parse_shards,
    pci_name,
    shard_of,
    shards_from_env,
)
from driver.vfio.errors import VfioError
from driver.vfio.uapi import MigState
from fwemu.cli import shard_from_hostname
from fwemu.link.base import LinkError
from fwemu.link.ifc import KiB, VfConfig, VfInfo
from fwemu.link.inproc import InProcessLink
from fwemu.model.clock import LoopClock
from fwemu.model.firmware import Firmware

# --- SPEC parsing ---------------------------------------------------------------------------


def test_a_list_names_shard_i_by_its_ith_address() -> None:
    m = parse_shards("fw-a:50051, fw-b:50051,10.0.0.3:7,[::1]:50051")
    assert m.addresses == ("fw-a:50051", "fw-b:50051", "10.0.0.3:7", "[::1]:50051")
    assert m.count == 4 and m.template is None
    assert m.address(2) == "10.0.0.3:7"


def test_a_template_names_shards_0_to_n_minus_1() -> None:
    m = parse_shards("fwemu-{shard}.fwemu.vfio.svc.cluster.local:50051@3")
    assert m.addresses == tuple(f"fwemu-{k}.fwemu.vfio.svc.cluster.local:50051" for k in range(3))
    assert m.template == "fwemu-{shard}.fwemu.vfio.svc.cluster.local:50051"
    assert m.spec == "fwemu-{shard}.fwemu.vfio.svc.cluster.local:50051@3"


def test_a_single_address_is_one_shard() -> None:
    assert parse_shards("127.0.0.1:50051") == ShardMap(("127.0.0.1:50051",))


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "empty shard map"),
        ("   ", "empty shard map"),
        ("fw:50051,", "shard 1: empty address"),
        ("fw:50051,,fw2:1", "shard 1: empty address"),
        ("fw", "shard 0: 'fw' is not HOST:PORT"),
        ("fw:0", "port 1..65535"),
        ("fw:65536", "port 1..65535"),
        ("fw:http", "not HOST:PORT"),
        (":50051", "not HOST:PORT"),
        ("fw a:1", "not HOST:PORT"),
        ("fw:1,fw:1", "shards 0 and 1 are both fw:1"),
        ("fw-{shard}:50051", "needs @N"),
        ("fw-{shard}:50051@", "@ is not a shard count"),
        ("fw-{shard}:50051@x", "@x is not a shard count"),
        ("fw-{shard}:50051@-1", "@-1 is not a shard count"),
        ("fw-{shard}:50051@0", "a shard map has 1..65536 shards"),
        (f"fw-{{shard}}:50051@{MAX_SHARDS + 1}", "a shard map has 1..65536 shards"),
        ("fw:50051@4", "has no {shard}"),
        ("fw-{shards}:50051@4", "has no {shard}"),
        ("fw-{shard}-{n}:50051@4", "the only placeholder is {shard}"),
        ("fw-{shard}:1,fw2:1@2", "holds ',' or '@'"),
        ("fw-{shard}@x:1@2", "holds ',' or '@'"),
        ("fw-{shard}:6553{shard}@10", "shard 6: 'fw-6:65536' is not HOST:PORT"),
    ],
)
def test_malformed_specs_are_refused_with_a_clear_reason(spec: str, says: str) -> None:
    with pytest.raises(ShardSpecError, match=says.replace("{", r"\{").replace("}", r"\}")):
        parse_shards(spec)


def test_the_environment_variable_names_itself_in_its_errors() -> None:
    assert shards_from_env({}) is None
    assert shards_from_env({SHARDS_ENV: " "}) is None
    assert shards_from_env({SHARDS_ENV: "a:1,b:2"}) == ShardMap(("a:1", "b:2"))
    with pytest.raises(ShardSpecError, match=f"^{SHARDS_ENV}: .*@N"):
        shards_from_env({SHARDS_ENV: "fw-{shard}:1"})


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_host = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
_port = st.integers(1, 65535)
_address = st.builds(lambda h, p: f"{h}:{p}", _host, _port)


@given(st.lists(_address, min_size=1, max_size=20, unique=True))
def test_a_list_spec_round_trips(addresses: list[str]) -> None:
    m = from_addresses(addresses)
    assert parse_shards(m.spec) == m
    assert parse_shards(", ".join(addresses)) == m  # blanks around entries are dropped
    assert [m.address(k) for k in range(m.count)] == addresses


@given(
    st.builds(
        lambda a, b, p: f"{a}{{shard}}{b}:{p}",
        st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
        st.from_regex(r"(\.[a-z]([a-z0-9-]{0,6}[a-z0-9])?){0,4}", fullmatch=True),
        _port,
    ),
    st.integers(1, 64),
)
def test_a_template_spec_round_trips(template: str, n: int) -> None:
    m = from_template(template, n)
    assert parse_shards(m.spec) == m
    assert m.count == n and len(set(m.addresses)) == n
    assert m.addresses[n - 1] == template.replace("{shard}", str(n - 1))


# --- naming -----------------------------------------------------------------------------------


def test_shard_0_keeps_the_single_firmware_names() -> None:
    assert pci_name(1) == pci_name(1, 0) == "0000:81:00.1"
    assert pci_name(9, 0) == "0000:81:01.1"
    assert pci_name(2, 1) == "0001:81:00.2"
    assert pci_name(10, 0x1F) == "001f:81:01.2"


@given(st.integers(0, 2047), st.integers(0, MAX_SHARDS - 1))
def test_a_device_name_gives_back_its_shard_and_function(function_id: int, shard: int) -> None:
    name = pci_name(function_id, shard)
    assert parse_pci_name(name) == (shard, function_id)
    assert shard_of(name) == shard
    assert shard_of(name.upper()) == shard


@pytest.mark.parametrize("name", ["", "81:00.1", "0000:81:00.8", "00000:81:00.1", "0000:81:00"])
def test_names_that_are_not_pci_names_are_refused(name: str) -> None:
    with pytest.raises(ShardSpecError, match="not a PCI device name"):
        shard_of(name)


def test_a_device_maps_to_its_shards_firmware() -> None:
    m = parse_shards("fw-{shard}:50051@2")
    assert m.address_of("0000:81:00.3") == "fw-0:50051"
    assert m.address_of("0001:81:00.3") == "fw-1:50051"
    with pytest.raises(ShardSpecError, match=r"0002:81:00\.1 is on shard 2 .* shards 0\.\.1"):
        m.address_of("0002:81:00.1")
    with pytest.raises(ShardSpecError, match="no shard 5"):
        m.address(5)


# --- fwemu --shard auto -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "shard"),
    [("fwemu-0", 0), ("fwemu-12", 12), ("my-fw-emu-3", 3), ("fwemu-2.fwemu.vfio.svc", 2)],
)
def test_shard_auto_reads_the_statefulset_ordinal(hostname: str, shard: int) -> None:
    assert shard_from_hostname(hostname) == shard


@pytest.mark.parametrize("hostname", ["fwemu", "fwemu-", "fwemu-x", "fwemu-65536", "laptop"])
def test_shard_auto_refuses_a_hostname_without_an_ordinal(hostname: str) -> None:
    with pytest.raises(ValueError, match="does not end in -K"):
        shard_from_hostname(hostname)


# --- a registry over several firmwares --------------------------------------------------------


class FlakyLink(InProcessLink):
    """An in-process firmware that can stop answering."""

    down = False

    async def list_vfs(self, function_ids: Sequence[int] = ()) -> list[VfInfo]:
        if self.down:
            raise LinkError("firmware connection lost: UNAVAILABLE")
        return await super().list_vfs(function_ids)


def firmwares(n: int, vfs: int = 2) -> list[Firmware]:
    out = []
    for k in range(n):
        fw = Firmware(LoopClock(), seed=k)
        fw.create_vfs(vfs, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
        out.append(fw)
    return out


async def test_a_registry_over_shards_names_shard_k_domain_k() -> None:
    fws = firmwares(3)
    reg = DeviceRegistry([InProcessLink(fw) for fw in fws])
    names = [r.core.name for r in await reg.refresh()]
    assert names == [pci_name(fn, k) for k in range(3) for fn in (1, 2)]


async def test_each_devices_commands_go_to_its_shards_firmware() -> None:
    """A device of shard 1 suspends shard 1's VF, and no other."""
    fws = firmwares(2)
    reg = DeviceRegistry([InProcessLink(fw) for fw in fws])
    await reg.refresh()
    dev = await reg.lookup(pci_name(2, 1))
    assert dev.mvdev.link is reg.links[1]
    await dev.mvdev.migration_set_state(MigState.STOP)  # suspends the VF
    suspended = [[vf.vhca_id for vf in fw.vfs.values() if vf.fully_suspended] for fw in fws]
    assert suspended == [[], [2]]


async def test_a_shard_that_stops_answering_keeps_its_devices() -> None:
    """One shard down: the others' devices come and go as usual, its own stay
    as they were; every shard down is EIO, naming each."""
    fws = firmwares(2)
    links = [FlakyLink(fw) for fw in fws]
    reg = DeviceRegistry(links)
    await reg.refresh()
    links[1].down = True
    fws[0].create_vfs(1, VfConfig(size=64 * KiB))
    names = [r.core.name for r in await reg.refresh()]
    assert names == [pci_name(1, 0), pci_name(2, 0), pci_name(3, 0), pci_name(1, 1), pci_name(2, 1)]
    assert not any(r.mvdev.mdev_detach for r in reg.devices.values())
    links[0].down = True
    with pytest.raises(VfioError) as e:
        await reg.refresh()
    assert e.value.errno == errno.EIO
    assert "shard 0: firmware connection lost" in str(e.value) and "shard 1:" in str(e.value)


async def test_one_link_keeps_the_single_firmware_behaviour() -> None:
    (fw,) = firmwares(1)
    link = FlakyLink(fw)
    reg = DeviceRegistry(link)
    assert [r.core.name for r in await reg.refresh()] == ["0000:81:00.1", "0000:81:00.2"]
    link.down = True
    with pytest.raises(VfioError, match="firmware unreachable: firmware connection lost"):
        await reg.refresh()


class CountingLink(FlakyLink):
    """Records what each list_vfs asked for."""

    def __init__(self, fw: Firmware) -> None:
        super().__init__(fw)
        self.asked: list[tuple[int, ...]] = []

    async def list_vfs(self, function_ids: Sequence[int] = ()) -> list[VfInfo]:
        self.asked.append(tuple(function_ids))
        return await super().list_vfs(function_ids)


async def test_a_fresh_lookup_asks_its_shard_for_its_function_only() -> None:
    """An open meets the VF in its slot now (removed: ENOENT; replaced: the
    new VF, the old device detached) without a look at every other VF: its
    cost does not grow with the VFs the firmwares have."""
    fws = firmwares(2, vfs=8)
    links = [CountingLink(fw) for fw in fws]
    reg = DeviceRegistry(links)
    assert len(await reg.refresh()) == 16
    assert [link.asked for link in links] == [[()], [()]]  # a refresh: every VF
    name = pci_name(3, 1)
    old = await reg.lookup(name, fresh=True)
    assert [link.asked[1:] for link in links] == [[], [(3,)]]
    assert await reg.lookup(name, fresh=True) is old  # still there: the same device
    # Removed, then another VF in its slot: a new device, the old one detached.
    fws[1].remove_vf(3)
    with pytest.raises(VfioError) as e:
        await reg.lookup(name, fresh=True)
    assert e.value.errno == errno.ENOENT
    fws[1].create_vfs(7, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))  # fills slot 3 first
    new = await reg.lookup(name, fresh=True)
    assert new is not old and old.mvdev.mdev_detach and not new.mvdev.mdev_detach
    # A VF that appeared since is found by its own open, with no full refresh.
    assert pci_name(9, 0) not in reg.devices
    fws[0].create_vfs(1, VfConfig(size=64 * KiB, dirty_bytes_per_s=0))
    assert (await reg.lookup(pci_name(9, 0))).mvdev.function_id == 9
    assert all(len(ids) == 1 for link in links for ids in link.asked[1:])
    # Names no shard holds change nothing and ask nobody.
    for bad in (pci_name(1, 2), "0000:81:00.01", "nonsense"):
        with pytest.raises(VfioError) as e:
            await reg.lookup(bad, fresh=True)
        assert e.value.errno == errno.ENOENT
    assert sum(len(link.asked) for link in links) == 2 + 5  # the refresh, five lookups


async def test_a_fresh_lookup_on_a_shard_not_answering_is_a_refresh() -> None:
    """Its shard down: the device is kept as it was (its commands fail on
    the link), as a refresh keeps it; every shard down is EIO."""
    fws = firmwares(2)
    links = [CountingLink(fw) for fw in fws]
    reg = DeviceRegistry(links)
    await reg.refresh()
    dev = await reg.lookup(pci_name(1, 1))
    links[1].down = True
    assert await reg.lookup(pci_name(1, 1), fresh=True) is dev
    links[0].down = True
    with pytest.raises(VfioError) as e:
        await reg.lookup(pci_name(1, 1), fresh=True)
    assert e.value.errno == errno.EIO


def test_a_registry_needs_a_link() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DeviceRegistry([])

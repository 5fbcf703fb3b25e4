"""Migration across hosts with two agents (issue 16): two `vfio-driver serve
--vfs 0 --scenario-service` processes (no memory shared between the two
sides' drivers and agents but the socket), a destination agent
(`serve_incoming`) beside the destination driver and the source agent
(`migrate_to`) beside the source driver, both in this process with their own
clients.  In the mTLS pass the drivers require client certificates and the
agent channel is mutual TLS too (the PKI's server certificate on the
listener, the admin's on the source).

Every hostile stream ends with a clear error, the destination reset out of
RESUMING, and the agent serving the next migration."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from driver.shards import pci_name
from driver.vfio.uapi import MigState
from fwemu.link.ifc import MiB, VfConfig
from grpcsvc.spawn import DRIVER
from grpcsvc.tls import ClientTls, TlsError
from tests.support import tls_mode
from tests.support.tls import ADMIN
from tests.support.tls_mode import served
from tests.support.vfioclient_migration import options
from vfioclient import VfioClient
from vfioclient.migration import (
    Address,
    DeviceMigration,
    IncomingOptions,
    IncomingReport,
    ListenerTls,
    MigrationError,
    MigrationOptions,
    OutgoingDevice,
    at_first_ack,
    migrate_to,
    serve_incoming,
    wire,
)
from vfioclient.migration.connection import Connection, dial, listen
from vfioclient.scenario import ScenarioClient

pytestmark = pytest.mark.grpc

QUIET = ("--log-level", "error", "--loop", "asyncio")
WORKLOAD = {"size": 2 * MiB, "dirty_bytes_per_s": 4 * MiB}
BOUND = 30.0


@dataclass(frozen=True)
class Hosts:
    source: str  # the source driver (its Scenario service on the same port)
    destination: str


@pytest.fixture(name="hosts", scope="module")
def hosts_fixture() -> Iterator[Hosts]:
    with (
        served(DRIVER, "--vfs", "0", "--scenario-service", *QUIET) as (_, a),
        served(DRIVER, "--vfs", "0", "--scenario-service", *QUIET) as (_, b),
    ):
        yield Hosts(a, b)


def listener() -> ListenerTls | None:
    if not tls_mode.enabled():
        return None
    pki = tls_mode.session_pki()
    return ListenerTls(str(pki.server.cert), str(pki.server.key), str(pki.ca))


def source_tls() -> ClientTls | None:
    return tls_mode.session_pki().client_tls(ADMIN) if tls_mode.enabled() else None


@dataclass
class Side:
    client: VfioClient
    scenario: ScenarioClient
    name: str = ""
    vhca: int = 0

    async def new_vf(self, **config: object) -> None:
        (vf,) = await self.scenario.create_vfs(1, VfConfig(**{**WORKLOAD, **config}))  # type: ignore[arg-type]
        await self.client.list_devices()  # the registry probes it
        self.name, self.vhca = pci_name(vf.function_id), vf.vhca_id

    async def open_count(self) -> int:
        """How many fds of the VF are open in its driver (its agent closes its own)."""
        return next(d.open_count for d in await self.client.list_devices() if d.name == self.name)


@dataclass
class Rig:
    src: Side
    dst: Side
    agent: asyncio.Task[list[IncomingReport]]
    address: Address
    reports: list[IncomingReport]
    stop: asyncio.Event
    source_state: MigState | None = None  # after the last migrate, before its fd closed

    async def migrate(self, o: MigrationOptions | None = None, **kw: object) -> object:
        o = o or options()
        fd = await self.src.client.open_device(self.src.name)
        try:
            return await asyncio.wait_for(
                migrate_to(
                    [
                        OutgoingDevice(
                            self.src.client,
                            fd,
                            str(kw.pop("into", self.dst.name)),
                            name=self.src.name,
                        )
                    ],
                    str(self.address),
                    o,
                    tls=source_tls(),
                    **kw,  # type: ignore[arg-type]
                ),
                BOUND,
            )
        finally:
            self.source_state = await self.src.client.get_state(fd)
            await self.src.client.close(fd)

    def verifying(self, o: MigrationOptions) -> MigrationOptions:
        async def digests(d: DeviceMigration) -> tuple[str, str]:
            return await self.src.scenario.digest(self.src.vhca), d.destination_digest

        o.digests = digests
        return o

    async def report(self, count: int) -> IncomingReport:
        """The agent's `count`th report, once it is there."""
        for _ in range(200):
            if len(self.reports) >= count:
                return self.reports[count - 1]
            await asyncio.sleep(0.05)
        raise AssertionError(f"the agent reported {len(self.reports)} migrations, not {count}")


@contextlib.asynccontextmanager
async def rig(
    hosts: Hosts, *, only: str | None = None, idle_timeout_s: float = 5.0, digest_s: float = 0.0
) -> AsyncIterator[Rig]:
    src = Side(await VfioClient.connect(hosts.source), await ScenarioClient.connect(hosts.source))
    dst = Side(
        await VfioClient.connect(hosts.destination), await ScenarioClient.connect(hosts.destination)
    )
    await src.new_vf()
    await dst.new_vf()
    reports: list[IncomingReport] = []
    stop = asyncio.Event()
    bound: asyncio.Future[Address] = asyncio.get_running_loop().create_future()

    async def digest(name: str) -> str:
        assert name == dst.name
        await asyncio.sleep(digest_s)  # a slow firmware, if asked for
        return await dst.scenario.digest(dst.vhca)

    agent = asyncio.create_task(
        serve_incoming(
            dst.client,
            "tcp:127.0.0.1:0",
            only=only,
            options=IncomingOptions(idle_timeout_s=idle_timeout_s),
            digest=digest,
            tls=listener(),
            on_listening=bound.set_result,
            on_report=reports.append,
            stop=stop,
        )
    )
    try:
        yield Rig(src, dst, agent, await bound, reports, stop)
    finally:
        stop.set()
        await asyncio.wait_for(agent, 10)
        for side in (src, dst):
            await side.client.aclose()
            await side.scenario.aclose()


def reconfigure_on_first_ack(r: Rig, o: MigrationOptions) -> MigrationOptions:
    """The source's guest adds a queue pair when the first approval arrives:
    a REINIT after an ack was obtained."""

    async def reconfigure() -> None:
        await r.src.scenario.reconfigure(r.src.vhca)

    at_first_ack(o, r.src.name, reconfigure)
    return o


async def check_clean_failure(r: Rig, nth: int, match: str) -> IncomingReport:
    """The agent's `nth` migration failed with `match` and left nothing open
    on the destination (its VF reset out of RESUMING, the fd closed); a
    migration after it completes, verified."""
    rep = await r.report(nth)
    assert rep.status in ("failed", "refused") and rep.error is not None and match in rep.error, rep
    assert await r.dst.open_count() == 0
    ok = await r.migrate(r.verifying(options()))
    assert ok.verified  # type: ignore[attr-defined]
    return rep


# --- migrations --------------------------------------------------------------------------


async def test_a_cross_host_migration_with_a_reinit_verifies(hosts: Hosts) -> None:
    """Two drivers, two agents: the REINIT re-arms the ack over the return
    path (two INIT_DATA_SENT, two approvals), the switchover waits for the
    new initial bytes, and the digests (the destination's from its own
    firmware, on the return path) are equal."""
    async with rig(hosts) as r:
        o = reconfigure_on_first_ack(r, r.verifying(options()))
        rep = await r.migrate(o)
        assert rep.status == "completed" and rep.verified  # type: ignore[attr-defined]
        assert rep.channel == str(r.address)  # type: ignore[attr-defined]
        (ev,) = rep.reinits  # type: ignore[attr-defined]
        assert (ev.phase, ev.handling) == ("precopy", "ack re-armed")
        (dev,) = rep.devices  # type: ignore[attr-defined]
        assert dev.init_data_sent == 2 and dev.acks == 2
        assert dev.precopy_bytes - ev.precopy_bytes_before >= ev.initial_bytes
        assert dev.data_path == "shm (source), shm (destination)"
        assert dev.source_digest == dev.destination_digest != ""
        assert rep.downtime_s is not None and 0 < rep.downtime_s < rep.total_s  # type: ignore[attr-defined]
        mine = await r.report(1)
        assert mine.status == "completed" and mine.devices[0].acks == 2
        assert mine.devices[0].digest == dev.destination_digest
        assert r.source_state == MigState.STOP
        assert await r.dst.open_count() == 0


async def test_the_destination_digest_time_is_verification_not_downtime(hosts: Hosts) -> None:
    """As the one-host orchestrator keeps its digests hook out of the
    downtime, the source keeps out the time the destination agent spent on
    its digests (LOADED says it): a 0.5 s digest lands in hook_s."""
    async with rig(hosts, digest_s=0.5) as r:
        rep = await r.migrate(r.verifying(options()))
        assert rep.verified  # type: ignore[attr-defined]
        assert rep.hook_s >= 0.5  # type: ignore[attr-defined]
        assert 0 < rep.downtime_s < 0.5  # type: ignore[attr-defined]


async def test_a_source_that_does_not_verify_gets_no_destination_digest(hosts: Hosts) -> None:
    """A source that asks for no digests (QEMU has none) gets none: the
    agent, which could take them, does not hash its devices while they are
    stopped (a 0.5 s digest would be 0.5 s more of the guest's downtime, and
    the source would not even count it as downtime)."""
    async with rig(hosts, digest_s=0.5) as r:
        t = time.monotonic()
        rep = await r.migrate(options())
        wall = time.monotonic() - t
        assert not rep.verified and rep.hook_s < 0.01  # type: ignore[attr-defined]
        mine = await r.report(1)
        assert mine.status == "completed" and not mine.verify
        assert mine.devices[0].digest == ""
        assert wall < 0.5 + rep.total_s  # type: ignore[attr-defined]
        assert rep.total_s < 0.5  # type: ignore[attr-defined]
        ok = await r.migrate(r.verifying(options()))  # asked: it hashes
        assert ok.verified and (await r.report(2)).verify  # type: ignore[attr-defined]


async def test_grpc_data_path_on_both_sides(hosts: Hosts) -> None:
    async with rig(hosts) as r:
        o = r.verifying(options(data_path="grpc"))
        rep = await r.migrate(o)
        assert rep.verified  # type: ignore[attr-defined]
        assert rep.devices[0].data_path == "grpc (source), shm (destination)"  # type: ignore[attr-defined]


async def test_a_destination_that_fails_its_load_fails_the_source_with_the_errno(
    hosts: Hosts,
) -> None:
    """LOAD_VHCA_STATE refused on the destination: the source hears the
    errno on the return path, runs again; the destination is reset."""
    async with rig(hosts) as r:
        await r.dst.scenario.inject_fault(r.dst.vhca, "fail", opcode="LOAD_VHCA_STATE", count=1000)
        with pytest.raises(MigrationError, match="destination agent") as e:
            await r.migrate()
        assert e.value.errno is not None and e.value.errno not in (0, errno.ECONNRESET)
        assert e.value.report is not None and e.value.report.status == "failed"
        assert r.source_state == MigState.RUNNING
        rep = await r.report(1)
        assert rep.status == "failed" and rep.errno == e.value.errno
        assert await r.dst.open_count() == 0


async def test_the_agents_load_setup_runs_alongside_the_sources_save_setup(
    hosts: Hosts,
) -> None:
    """QEMU's source does not wait for -incoming's load_setup: with 0.5 s on
    each side's setup (the destination's SUSPEND on its way to RESUMING, the
    source's first SAVE), the setup takes about 0.5 s, not 1 s."""
    async with rig(hosts) as r:
        slow = {"delay_s": 0.5, "count": 1}
        await r.dst.scenario.inject_fault(r.dst.vhca, "delay", opcode="SUSPEND_VHCA", **slow)  # type: ignore[arg-type]
        await r.src.scenario.inject_fault(r.src.vhca, "delay", opcode="SAVE_VHCA_STATE", **slow)  # type: ignore[arg-type]
        rep = await r.migrate(r.verifying(options()))
        assert rep.verified  # type: ignore[attr-defined]
        setup = rep.phases["setup"]  # type: ignore[attr-defined]
        assert 0.5 <= setup < 0.9, setup  # one after the other: >= 1.0


async def test_a_source_that_fails_its_save_setup_leaves_both_sides_clean(
    hosts: Hosts,
) -> None:
    """The agent's load_setup runs while the source's save_setup does (as
    QEMU's source does not wait for -incoming): the source's first SAVE
    refused fails the migration once both are done; the source runs, the
    destination is reset and closed, and the next migration completes."""
    async with rig(hosts) as r:
        await r.src.scenario.inject_fault(r.src.vhca, "fail", opcode="SAVE_VHCA_STATE", count=1)
        with pytest.raises(MigrationError) as e:
            await r.migrate()
        assert e.value.report is not None and e.value.report.status == "failed"
        assert r.source_state == MigState.RUNNING
        rep = await r.report(1)
        assert rep.status == "failed", rep
        assert await r.dst.open_count() == 0
        ok = await r.migrate(r.verifying(options()))
        assert ok.verified  # type: ignore[attr-defined]


async def test_a_destination_it_was_not_started_for_is_refused(hosts: Hosts) -> None:
    async with rig(hosts) as r:
        r_only = r.dst.name
    async with rig(hosts, only=r_only) as r:  # a new destination VF, not the agent's
        with pytest.raises(MigrationError, match=f"accepts a migration into {r_only} only") as e:
            await r.migrate()
        assert e.value.errno == errno.EINVAL
        assert r.source_state == MigState.RUNNING
        assert [x.status for x in r.reports] == ["refused"]  # nothing changed


async def test_a_busy_destination_is_refused(hosts: Hosts) -> None:
    """One migration at a time per destination device: a second one is
    refused (EBUSY) at once, not queued."""
    async with rig(hosts) as r:
        holder = await raw(r)
        await holder.send(wire.header([wire.DeviceSpec(0, "x", r.dst.name, 1 << 20)]))
        assert isinstance(await next_return(holder), wire.Ready)
        with pytest.raises(MigrationError, match="busy") as e:
            await r.migrate()
        assert e.value.errno == errno.EBUSY
        await holder.close()
        assert (await r.report(1)).status == "refused"
        await check_clean_failure(r, 2, "closed the connection")


async def test_an_old_generation_ack_does_not_release_the_switchover() -> None:
    """A destination that approves every INIT_DATA_SENT with the generation
    before the one it carried: the source never counts it and fails after
    its iterations, without a switchover."""
    # (a fake agent: a source alone, with an in-process firmware behind a driver)
    from tests.support.vfioclient_migration import in_process_rig

    async with in_process_rig() as ipr:
        pair, _, _ = await ipr.pair()

        async def fake_agent(conn: Connection) -> None:
            dec = wire.Decoder("forward")
            buf = bytearray(1 << 16)
            while True:
                while (ev := dec.next_event()) is not None:
                    if isinstance(ev, wire.Header):
                        await conn.send(wire.ready([wire.ReadyDevice(0, "grpc", False)]))
                    elif isinstance(ev, wire.InitDataSent):
                        await conn.send(wire.switchover_ack(0, ev.generation - 1))
                n = await conn.recv_into(memoryview(buf))
                if n == 0:
                    return
                dec.feed(memoryview(buf)[:n])

        server, bound = await listen(
            Address.parse("tcp:127.0.0.1:0"), fake_agent, None, idle_timeout_s=5
        )
        try:
            o = options(max_precopy_iterations=50)
            with pytest.raises(MigrationError, match="no switchover-ack"):
                await asyncio.wait_for(
                    migrate_to([OutgoingDevice(ipr.src, pair.source_fd, "d")], str(bound), o), BOUND
                )
            assert await ipr.src.get_state(pair.source_fd) == MigState.RUNNING
        finally:
            server.close()


# --- hostile streams -----------------------------------------------------------------------


async def raw(r: Rig) -> Connection:
    return await dial(r.address, source_tls(), idle_timeout_s=10, connect_timeout_s=5)


async def next_return(conn: Connection) -> wire.Event:
    dec = wire.Decoder("return")
    buf = bytearray(4096)
    while (ev := dec.next_event()) is None:
        n = await conn.recv_into(memoryview(buf))
        assert n, "the agent closed without a word"
        dec.feed(memoryview(buf)[:n])
    return ev


async def started(r: Rig, buffer_size: int = 1 << 20) -> Connection:
    """A raw source past READY: the destination is RESUMING."""
    conn = await raw(r)
    await conn.send(wire.header([wire.DeviceSpec(0, "x", r.dst.name, buffer_size)]))
    assert isinstance(await next_return(conn), wire.Ready)
    await conn.send(wire.setup_state(0))
    return conn


async def expect_error(conn: Connection) -> wire.Error:
    ev = await next_return(conn)
    assert isinstance(ev, wire.Error), ev
    return ev


@pytest.mark.parametrize(
    ("what", "bytes_", "match"),
    [
        ("magic", b"GET / HTTP/1.1\r\n\r\n", "not a migration stream"),
        ("version", wire._QII.pack(wire.MAGIC, 99, 2) + b"{}", "version 99"),
        ("header", wire._QII.pack(wire.MAGIC, wire.VERSION, 1 << 30), "over"),
        ("json", wire._QII.pack(wire.MAGIC, wire.VERSION, 3) + b"{{{", "not JSON"),
    ],
)
async def test_a_bad_stream_start_is_refused_with_an_error(
    hosts: Hosts, what: str, bytes_: bytes, match: str
) -> None:
    async with rig(hosts) as r:
        conn = await raw(r)
        await conn.send(bytes_)
        err = await expect_error(conn)
        assert err.errno == errno.EPROTO and match in err.reason, (what, err)
        await conn.close()
        await check_clean_failure(r, 1, match)


async def test_an_unknown_device_is_refused_with_enoent(hosts: Hosts) -> None:
    async with rig(hosts) as r:
        with pytest.raises(MigrationError) as e:
            await r.migrate(into="0000:99:00.7")
        assert e.value.errno == errno.ENOENT
        await check_clean_failure(r, 1, "0000:99:00.7")


@pytest.mark.parametrize(
    ("what", "tail", "match"),
    [
        ("oversized payload", wire.data_header(0, (1 << 20) + 1), "not in 1..1048576"),
        ("unknown tag", wire._Q.pack(0xFFFFFFFFEF1000FF), "unknown tag"),
        ("undeclared section", wire.end_of_state(7), "never declared"),
        ("run before complete", wire.run(), "RUN before COMPLETE"),
    ],
)
async def test_a_hostile_stream_after_ready_resets_the_destination(
    hosts: Hosts, what: str, tail: bytes, match: str
) -> None:
    async with rig(hosts) as r:
        conn = await started(r)
        assert await r.dst.open_count() == 1  # the agent's, RESUMING
        await conn.send(wire.data_header(0, 4096), b"\0" * 4096, tail)
        err = await expect_error(conn)
        assert err.errno == errno.EPROTO and match in err.reason, (what, err)
        await conn.close()
        await check_clean_failure(r, 1, match)


async def test_a_source_gone_mid_stream_resets_the_destination(hosts: Hosts) -> None:
    """The source dies in the middle of a payload (the connection closes):
    the destination is reset, the agent serves the next migration."""
    async with rig(hosts) as r:
        conn = await started(r)
        await conn.send(wire.data_header(0, 65536), b"\0" * 1000)
        conn.abort()
        await check_clean_failure(r, 1, "closed the connection mid-migration")


async def test_a_silent_source_times_out(hosts: Hosts) -> None:
    """A source that stops talking (half-open) is dropped after the idle timeout."""
    async with rig(hosts, idle_timeout_s=1.0) as r:
        conn = await started(r)
        rep = await r.report(1)
        assert rep.errno == errno.ETIMEDOUT
        await conn.close()
        await check_clean_failure(r, 1, "nothing from the source")


async def test_an_abort_from_the_source_resets_the_destination(hosts: Hosts) -> None:
    async with rig(hosts) as r:
        conn = await started(r)
        await conn.send(wire.abort(errno.EIO, "the source gave up"))
        await check_clean_failure(r, 1, "the source gave up")
        await conn.close()


# --- listen policy -------------------------------------------------------------------------


async def test_off_host_without_tls_is_refused_unless_insecure(hosts: Hosts) -> None:
    async with await VfioClient.connect(hosts.destination) as c:
        with pytest.raises(TlsError, match="without TLS"):
            await serve_incoming(c, "tcp:0.0.0.0:0", once=True)
        stop = asyncio.Event()
        bound: asyncio.Future[Address] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            serve_incoming(
                c, "tcp:0.0.0.0:0", insecure=True, on_listening=bound.set_result, stop=stop
            )
        )
        assert (await bound).port > 0
        stop.set()
        assert await task == []


@pytest.mark.skipif(not tls_mode.enabled(), reason="the mTLS pass")
async def test_under_mtls_a_source_without_a_client_certificate_is_refused(hosts: Hosts) -> None:
    """The listener requires a client certificate signed by the CA: without
    one the handshake fails (TLS 1.3: the server closes after it), no READY
    ever comes, nothing is opened on the destination."""
    async with rig(hosts) as r:
        pki = tls_mode.session_pki()
        answered = b""
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
            conn = await dial(
                r.address, ClientTls(str(pki.ca)), idle_timeout_s=5, connect_timeout_s=5
            )
            await conn.send(wire.header([wire.DeviceSpec(0, "x", r.dst.name, 1 << 20)]))
            buf = bytearray(64)
            answered = bytes(buf[: await conn.recv_into(memoryview(buf))])
        assert answered == b""
        assert await r.dst.open_count() == 0
        assert r.reports == []
